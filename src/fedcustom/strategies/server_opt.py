"""Server optimizers: the round's aggregate as a pseudo-gradient (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2; FedAvgM from Hsu et al., 2019).

Whatever merged the updates (FedAvg, a robust strategy, central DP, secure aggregation) produces an
aggregate state; the server optimizer then moves the global state along ``delta = aggregate - x``:

- fedavg:   x <- x + lr * delta                      (lr 1 returns the aggregate itself: plain FedAvg)
- avgm:     m <- momentum * m + delta;  x <- x + lr * m
- adagrad:  v <- v + delta^2
- yogi:     v <- v - (1 - b2) * delta^2 * sign(v - delta^2)
- adam:     v <- b2 * v + (1 - b2) * delta^2
- adaptive (adagrad, yogi, adam): m <- b1 * m + (1 - b1) * delta;  x <- x + lr * m / (sqrt(v) + eps)

As in the paper, the second moment starts at eps^2 (``v_{-1} >= tau^2``) and there is no bias correction.
Moments are kept in float64, one per trainable tensor; they are the only server state besides the global
tensors, and they go into checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcustom.errors import ConfigError

State = dict[str, torch.Tensor]
SERVER_OPTIMIZERS = ("fedavg", "avgm", "adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ServerOptSettings:
    """Which server optimizer and its hyper-parameters."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3


class ServerOptimizer:
    """Applies one step per round to the global state; holds its moments."""

    def __init__(self, settings: ServerOptSettings) -> None:
        if settings.name not in SERVER_OPTIMIZERS:
            raise ConfigError(f"server optimizer {settings.name!r}: expected one of {', '.join(SERVER_OPTIMIZERS)}")
        self.settings = settings
        self.m: State = {}  # first moment (avgm: the momentum buffer)
        self.v: State = {}  # second moment (adaptive optimizers)
        self.steps = 0

    @property
    def is_identity(self) -> bool:
        """FedAvg with lr 1: the aggregate becomes the global state unchanged (bit for bit)."""
        return self.settings.name == "fedavg" and self.settings.lr == 1.0

    def step(self, current: State, aggregate: State) -> State:
        """The next global state from the current one and the round's aggregate."""
        self.steps += 1
        if self.is_identity:
            return aggregate
        out = {}
        for name, x in current.items():
            if not x.is_floating_point():
                out[name] = aggregate[name]
                continue
            delta = aggregate[name].double() - x.double()
            out[name] = (x.double() + self._direction(name, delta)).to(x.dtype)
        return out

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """How far tensor ``name`` moves this round, given its pseudo-gradient ``delta`` (float64)."""
        s = self.settings
        if s.name == "fedavg":
            return s.lr * delta
        if s.name == "avgm":
            m = self.m[name] = s.momentum * self.m[name] + delta if name in self.m else delta.clone()
            return s.lr * m
        m = self.m.get(name, torch.zeros_like(delta))
        v = self.v.get(name, torch.full_like(delta, s.eps**2))
        m = s.beta1 * m + (1 - s.beta1) * delta
        square = delta * delta
        if s.name == "adagrad":
            v = v + square
        elif s.name == "yogi":
            v = v - (1 - s.beta2) * square * torch.sign(v - square)
        else:  # adam
            v = s.beta2 * v + (1 - s.beta2) * square
        self.m[name], self.v[name] = m, v
        return s.lr * m / (v.sqrt() + s.eps)

    def state_dict(self) -> tuple[State, dict]:
        """Moments (tensors) and the step count (JSON), for checkpoints."""
        tensors = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return tensors, {"steps": self.steps}

    def load_state_dict(self, tensors: State, meta: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.m = {k[2:]: v for k, v in tensors.items() if k.startswith("m.")}
        self.v = {k[2:]: v for k, v in tensors.items() if k.startswith("v.")}
        self.steps = int(meta["steps"])
