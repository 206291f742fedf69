"""The task kinds by name (`get_task`), and a split's examples read through its kind (`load_split`)."""

from __future__ import annotations

from stages.config import Config, DataConfig
from stages.data import Examples, with_transfer
from stages.tasks.base import Task
from stages.tasks.causal_lm import CausalLM
from stages.tasks.extractive_qa import ExtractiveQA
from stages.tasks.multi_label import MultiLabel
from stages.tasks.regression import Regression
from stages.tasks.sequence_classification import SequenceClassification
from stages.tasks.token_classification import TokenClassification
from cache_format import KDError

__all__ = ["TASKS", "get_task", "load_split"]

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


def load_split(cfg: Config, split: str, *, transfer: bool = False) -> Examples:
    """The examples of `data.<split>`; with `transfer`, followed by the unlabelled `data.transfer` set."""
    path = getattr(cfg.data, split)
    if path is None:
        raise KDError(f"data.{split} is not set; give the path of the {split} file in params.yaml")
    task = get_task(cfg.data)
    examples = task.load(path)
    if transfer and cfg.data.transfer:
        examples = with_transfer(examples, task.load(cfg.data.transfer, transfer=True))
    return examples
