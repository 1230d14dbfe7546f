"""What every customization method provides, and the registry that names them.

A method turns the shared backbone into the model a client trains. Its contract (after
torchtune's ``AdapterModule``): the parameters with ``requires_grad=True`` are exactly the
tensors that are trained locally, uploaded, averaged and broadcast; everything else is the
frozen backbone that never leaves a client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import TaskType
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.methods.defaults import Recommended, recommended
from fedcustom.registry import Registry


Builder = Callable[[nn.Module, MethodConfig, str, PreTrainedTokenizerBase], nn.Module]


@dataclass(frozen=True)
class Method:
    """A registered customization method."""

    name: str
    build: Builder  # (backbone, method config, task, tokenizer) -> trainable model
    recommended: Callable[[MethodConfig, str], Recommended]  # settings for unset config keys (methods.defaults)
    description: str
    protocol: str = "parameter_sharing"  # or "split" (methods/split), "distill" (methods/distill)
    save: Callable[[nn.Module, Path], None] | None = None  # default: save_trained
    saves_whole_model: bool = False  # True when ``save`` writes a whole HF model even from a PEFT model


_REGISTRY: Registry[Method] = Registry("method")


def table_defaults(name: str) -> Callable[[MethodConfig, str], Recommended]:
    """A method's row of the shared table in :mod:`fedcustom.methods.defaults`."""
    return lambda cfg, task: recommended(name, task, projection=name == "prefix" and cfg.prefix_projection)


def register(method: Method) -> Method:
    """Add a method under its name; one call per method module."""
    return _REGISTRY.register(method.name, method)


def get_method(name: str) -> Method:
    """The method registered as ``name``, or a clear error listing the known ones."""
    return _REGISTRY.get(name)


def method_names(protocol: str | None = None) -> list[str]:
    """Names of all registered methods (only those speaking ``protocol`` when given)."""
    return sorted(m.name for m in _REGISTRY if protocol is None or m.protocol == protocol)


def peft_task_type(task: str) -> TaskType | None:
    """PEFT's task type for one of our tasks (None: a task PEFT has no type for, e.g. images)."""
    from fedcustom.tasks import get_task

    kind = get_task(task).peft_task_type
    return TaskType(kind) if kind is not None else None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the tensors this method trains and sends, by parameter name (payloads, strategies and
    checkpoints work on the CPU whatever device the model is on)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the trainable tensors in place with ``state`` (names must match exactly)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise ValueError(f"state does not match trainable tensors (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_trained(model: nn.Module, out_dir: Path) -> None:
    """PEFT adapter format for adapter methods, a full ``save_pretrained`` folder otherwise."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
