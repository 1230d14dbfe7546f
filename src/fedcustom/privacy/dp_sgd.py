"""Record-level DP inside a client: DP-SGD (Abadi et al., 2016) through Opacus.

Each example's gradient is clipped to ``max_grad_norm`` and Gaussian noise of std
``noise_multiplier x max_grad_norm`` is added to every batch's summed gradient, so one client's
model reveals little about any one of its rows, whatever the server does. Opacus computes the
per-example gradients with module hooks; it handles LoRA's and prefix tuning's trainable modules
here, not PEFT's prompt embedding or a whole BERT (measured: both fail inside Opacus' per-sample
gradient stacking), so only ``lora`` and ``prefix`` accept ``--dp-sgd``.

Batches are drawn by shuffling, not Poisson sampling; the reported epsilon uses the sampling rate
batch / rows, the usual approximation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn



@dataclass(frozen=True)
class DPSGDSettings:
    """Per-example clipping bound and noise multiplier of DP-SGD."""

    noise_multiplier: float
    max_grad_norm: float
    reproducible: bool = False  # noise from torch's global RNG (seeded from the run seed) instead of the OS's entropy


@contextlib.contextmanager
def private_training(model: nn.Module, optimizer: torch.optim.Optimizer, settings: DPSGDSettings,
                     batch_size: int) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """(the module to call, the optimizer to step) with per-example clipping and noise; hooks removed after."""
    from opacus import GradSampleModule  # importing opacus takes ~3 s: only DP-SGD runs pay it
    from opacus.optimizers import DPOptimizer

    from fedcustom.privacy.dp import private_generator

    module = GradSampleModule(model)
    # Opacus draws its noise from torch's global RNG unless given a generator; that RNG is seeded from the run seed
    # (which the server knows), so by default the noise gets a generator of its own seeded from the OS's entropy
    private = DPOptimizer(optimizer, noise_multiplier=settings.noise_multiplier,
                          max_grad_norm=settings.max_grad_norm, expected_batch_size=batch_size,
                          generator=None if settings.reproducible else
                          private_generator(next(p for p in model.parameters() if p.requires_grad).device))
    try:
        yield module, private
    finally:
        module._close()  # removes the hooks and per-sample gradients: the shared backbone stays plain
        for param in model.parameters():
            param.grad_sample = None
