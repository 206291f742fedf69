"""Task kinds, one module each: how a kind's data is read and encoded, what its teacher signal is, its head,
losses and metrics. `get_task(cfg.data)` gives the stages the kind they run; they call only `Task` methods.

Adding a kind: a module here with a `Task` subclass, its entry in `TASKS`, and its settings entry in
stages/kinds.py (`TASK_KINDS`: the data.* options it reads and what it supports).
"""

from __future__ import annotations

from stages.config import DataConfig
from stages.tasks.base import Task
from stages.tasks.causal_lm import CausalLM
from stages.tasks.extractive_qa import ExtractiveQA
from stages.tasks.multi_label import MultiLabel
from stages.tasks.regression import Regression
from stages.tasks.sequence_classification import SequenceClassification
from stages.tasks.token_classification import TokenClassification

__all__ = ["Task", "TASKS", "get_task"]

TASKS: dict[str, type[Task]] = {
    SequenceClassification.name: SequenceClassification,
    ExtractiveQA.name: ExtractiveQA,
    MultiLabel.name: MultiLabel,
    Regression.name: Regression,
    TokenClassification.name: TokenClassification,
    CausalLM.name: CausalLM,
}


def get_task(data: DataConfig) -> Task:
    """The task kind named by `data.task`, bound to its data settings."""
    return TASKS[data.task](data)
