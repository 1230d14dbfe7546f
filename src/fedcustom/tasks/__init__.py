"""Tasks: what a run learns and how it is measured. A task owns its data preparation (the server's and a node's
own file), its backbone head, its evaluator and metrics, its validation score, its PEFT task type, its default
sequence length and what knowledge distillation exchanges for it. Nothing outside this package branches on a
task's name; adding a task (image classification, retrieval) is one module here plus one ``register`` call.

The registry imports no model code: a task's heavy work is imported inside its methods.
"""

from __future__ import annotations

from fedcustom.registry import Registry
from fedcustom.tasks.base import Task
from fedcustom.tasks.causal_lm import CausalLM
from fedcustom.tasks.classification import Classification
from fedcustom.tasks.image_classification import ImageClassification
from fedcustom.tasks.retrieval import Retrieval

_REGISTRY: Registry[Task] = Registry("task")


def register(task: Task) -> Task:
    return _REGISTRY.register(task.name, task)


def get_task(name: str) -> Task:
    """The registered task ``name`` (``model.task``, ``--task``)."""
    return _REGISTRY.get(name)


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY.names())


register(Classification())
register(CausalLM())
register(ImageClassification())
register(Retrieval())

__all__ = ["Task", "get_task", "register", "task_names"]
