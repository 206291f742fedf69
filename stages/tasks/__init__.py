"""Task kinds, one module each: how a kind's data is read and encoded, what its teacher signal is, its head,
losses and metrics. `get_task(cfg.data)` gives the stages the kind they run; they call only `Task` methods, and
the methods of `LabelledTask` (a label head, its logits and losses) through `labelled(task)`.

Adding a kind: a module here with a `Task` subclass (a `LabelledTask` if it has a label head), its entry in
`TASKS`, and its settings entry in stages/kinds.py (`TASK_KINDS`: the data.* options it reads, what it supports
and the distillation method that serves it).
"""

from __future__ import annotations

from stages.tasks.base import TORCH_DTYPES, LabelledTask, Task, TeacherSpec, labelled
from stages.tasks.causal_lm import CausalLM
from stages.tasks.check import check_data, checked
from stages.tasks.extractive_qa import ExtractiveQA
from stages.tasks.multi_label import MultiLabel
from stages.tasks.registry import TASKS, get_task, load_split
from stages.tasks.regression import Regression
from stages.tasks.sequence_classification import SequenceClassification
from stages.tasks.token_classification import TokenClassification

__all__ = ["Task", "LabelledTask", "labelled", "TeacherSpec", "TORCH_DTYPES", "TASKS", "get_task", "load_split",
           "check_data", "checked", "SequenceClassification", "MultiLabel", "Regression", "TokenClassification",
           "ExtractiveQA", "CausalLM"]
