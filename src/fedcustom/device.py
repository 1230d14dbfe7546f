"""Where a model runs and in which precision: ``--device`` and ``--precision``.

Each process resolves its own device (a Flower node picks its own: ``auto`` is CUDA where the node has it).
Everything that crosses a process boundary stays on the CPU: payloads are encoded from CPU copies
(``methods.trainable_state``) and decoded to CPU, so strategies, codecs and checkpoints never see device tensors;
batches and received tensors are moved to the model's device where they are used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fedcustom.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str, where: str = "train.device (--device)") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device this machine does
    not have is a ConfigError naming it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"{where}: {spec!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {spec!r} asked, but this machine has no CUDA device (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {spec!r} asked, but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: 'mps' asked, but Apple's Metal backend is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{where}: {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (a model lives on one device)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_precision(precision: str, device: torch.device, where: str = "train.precision (--precision)") -> None:
    """fp32 and bf16 run anywhere; fp16 autocast needs a GPU (on the CPU use bf16)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{where}: {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"{where}: fp16 autocast needs a GPU; on the CPU use --precision bf16")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass (the trainable tensors stay fp32: they are the master copies that
    payloads carry); fp32 is a no-op."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (its small range underflows gradients); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """This process's peak resident memory so far, and the device's peak allocated memory on CUDA, in MB."""
    import resource

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: kilobytes
    if device is not None and device.type == "cuda":
        peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def place_model(model: nn.Module, device: torch.device, precision: str, gradient_checkpointing: bool) -> nn.Module:
    """Move a built model to this process's device (a quantized backbone is already there), check the precision
    against it, and turn on gradient checkpointing (non-reentrant: frozen embeddings need no input gradients)."""
    check_precision(precision, device)
    if not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        model.to(device)
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ConfigError(f"train.gradient_checkpointing (--gradient-checkpointing): {type(model).__name__} does "
                              f"not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
