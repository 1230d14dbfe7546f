"""Tasks: what a run learns and how it is measured. A task owns its data preparation (the server's and a node's
own file), its backbone head, its evaluator and metrics, its validation score, its PEFT task type, its default
sequence length and what knowledge distillation exchanges for it. Nothing outside this package branches on a
task's name; adding a task (image classification, retrieval) is one module here plus one ``register`` call.

The registry imports no model code: a task's heavy work is imported inside its methods.
"""

from __future__ import annotations

from fedcustom.errors import FedCustomError
from fedcustom.tasks.base import Task
from fedcustom.tasks.causal_lm import CausalLM
from fedcustom.tasks.classification import Classification

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is registered twice")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name`` (``model.task``, ``--task``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FedCustomError(f"task {name!r}: expected one of {', '.join(_REGISTRY)}") from None


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


register(Classification())
register(CausalLM())

__all__ = ["Task", "get_task", "register", "task_names"]
