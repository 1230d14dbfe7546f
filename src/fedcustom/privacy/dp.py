"""Client-level differential privacy for federated averaging of named tensors.

Central DP follows DP-FedAvg (McMahan, Ramage, Talwar and Zhang, 2018, "Learning differentially
private recurrent language models", ICLR): every client's update is clipped to L2 norm ``C``, the
server averages the clipped updates and adds Gaussian noise calibrated to ``C``. Local DP lets each
client clip and noise its own update before upload, so the server is not trusted. Privacy loss is
tracked with the Renyi-DP accountant of the Sampled Gaussian Mechanism (Mironov, 2017; Mironov,
Talwar and Zhang, 2019) as implemented by opacus.

What the reported epsilon means:

* central mode: user-level (eps, delta)-DP of the released sequence of global models with respect
  to adding or removing one client's entire data set, against anyone who sees only the global
  models (the server is trusted). ``sample_rate = clients_per_round / clients``; the analysis
  assumes Poisson sampling, and the server's fixed-size sampling without replacement is the usual
  approximation of it.
* local mode: per-client (eps, delta)-DP of that client's uploads against the server itself, for
  distinguishing its real update from an abstaining (zero) update (sensitivity ``C``). The server
  knows who was sampled, so there is no subsampling amplification: step with ``sample_rate=1``
  once per round the client takes part (stepping every round bounds every client). For replacing
  the client's data by arbitrary other data the sensitivity is ``2C``: step with ``z / 2``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

State = dict[str, torch.Tensor]

NOISE_STREAM = 0xD9_5EED  # separates DP noise seeds from sampling and training seeds


def update_norm(delta: State) -> float:
    """L2 norm of all floating-point tensors taken together as one vector."""
    squares = sum(float(torch.linalg.vector_norm(t.double())) ** 2 for t in delta.values() if t.is_floating_point())
    return math.sqrt(squares)


def clip_update(delta: State, max_norm: float) -> tuple[State, float]:
    """``delta`` scaled by ``min(1, max_norm / norm)`` (non-float tensors untouched), and its original norm."""
    if not max_norm > 0:
        raise ValueError(f"clip norm must be positive, got {max_norm}")
    norm = update_norm(delta)
    if norm <= max_norm:
        return {name: t.clone() for name, t in delta.items()}, norm
    scale = max_norm / norm
    clipped = {name: (t.double() * scale).to(t.dtype) if t.is_floating_point() else t.clone()
               for name, t in delta.items()}
    return clipped, norm


def gaussian_noise_like(state: State, std: float, generator: torch.Generator) -> State:
    """N(0, std^2) per element of each float tensor (zeros for the others), reproducible from ``generator``.

    Noise is drawn on the CPU in sorted key order, so it does not depend on device or dict order.
    """
    if std < 0:
        raise ValueError(f"noise std must be non-negative, got {std}")
    noise = {}
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point() or std == 0:
            noise[name] = torch.zeros_like(t)
            continue
        draw_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        sample = torch.randn(t.shape, generator=generator, dtype=draw_dtype) * std
        noise[name] = sample.to(device=t.device, dtype=t.dtype)
    return {name: noise[name] for name in state}


def private_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: DP noise that nobody can regenerate, the server included (a
    generator derived from the run seed would let anyone who knows the seed subtract the noise)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def dp_noise_generator(reproducible: bool, seed: int, rnd: int, node: int | None = None) -> torch.Generator:
    """Round ``rnd``'s DP noise source: :func:`private_generator`, or with ``--dp-reproducible-noise`` (experiments
    only) :func:`noise_generator` of the run seed."""
    return noise_generator(seed, rnd, node) if reproducible else private_generator()


def noise_generator(seed: int, rnd: int, node: int | None = None) -> torch.Generator:
    """A CPU generator for round ``rnd``'s DP noise, derived from the run seed alone: reproducible, and so no
    privacy against whoever knows the seed (``--dp-reproducible-noise`` only).

    The server (central DP) passes no ``node``; a client (local DP) passes its node id, so every
    client draws independent noise and a resumed run draws the same noise as an uninterrupted one.
    """
    parts = [int(seed), int(rnd), NOISE_STREAM] + ([] if node is None else [int(node) + 1])
    state = np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _delta64(new: State, base: State) -> State:
    """``new - base`` in float64 for float tensors; non-float entries are dropped."""
    if set(new) != set(base):
        missing, extra = sorted(set(base) - set(new)), sorted(set(new) - set(base))
        raise ValueError(f"update does not match the global state: missing {missing}, unexpected {extra}")
    return {k: new[k].double() - base[k].double() for k, b in base.items() if b.is_floating_point()}


def _apply(base: State, delta64: State) -> State:
    """``base + delta`` cast back to ``base``'s dtypes; entries without a delta keep ``base``'s value."""
    return {k: (b.double() + delta64[k]).to(b.dtype) if k in delta64 else b.clone() for k, b in base.items()}


@dataclass(frozen=True)
class CentralDP:
    """DP-FedAvg on a trusted server: clip each client's delta, take the unweighted mean, add noise.

    The mean is deliberately unweighted. The DP guarantee needs a bound on how much one client can
    move the aggregate; clipping bounds each delta to ``clip_norm``, and an equal weight of ``1/m``
    turns that into sensitivity ``clip_norm / m``. Weighting by example count hands a client that
    reports (or has) many examples a weight close to 1, so its influence, and the noise needed to
    hide it, is no longer bounded by ``clip_norm / m``; the counts themselves would also leak.

    Denominator ``m``: with ``expected_clients=None`` (default) ``m`` is the number of updates
    actually aggregated. The server samples a fixed-size cohort, so this equals the textbook
    fixed denominator (expected cohort size, McMahan et al.'s ``f~_f``) whenever nobody drops out,
    and when clients fail or are rejected the step stays an unbiased mean instead of shrinking.
    The price is that the number of accepted updates is revealed; for the strict textbook
    estimator, whose analysis matches the accountant exactly, pass ``expected_clients``.
    The noise std on the mean is ``noise_multiplier * clip_norm / m`` either way, i.e. std
    ``noise_multiplier * clip_norm`` on the sum, which is what the accountant assumes.
    """

    clip_norm: float
    noise_multiplier: float
    expected_clients: int | None = None

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm}")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be non-negative, got {self.noise_multiplier}")
        if self.expected_clients is not None and self.expected_clients < 1:
            raise ValueError(f"expected_clients must be at least 1, got {self.expected_clients}")

    def noise_std(self, num_clients: int) -> float:
        """Std of the Gaussian noise added to the mean of ``num_clients`` clipped deltas."""
        m = self.expected_clients or num_clients
        return self.noise_multiplier * self.clip_norm / m

    def aggregate(self, global_state: State, client_states: list[State],
                  generator: torch.Generator) -> tuple[State, dict[str, float]]:
        """New global state ``global + mean(clip(client - global)) + noise``, and round statistics.

        Stats: ``mean_norm`` (mean pre-clip delta norm), ``clipped_fraction``, ``noise_std`` (on
        the mean) and ``clients`` (updates aggregated). Non-float tensors keep the global value.
        """
        if not client_states:
            return {k: t.clone() for k, t in global_state.items()}, {
                "mean_norm": 0.0, "clipped_fraction": 0.0, "noise_std": 0.0, "clients": 0.0}
        total: State = {}
        norms = []
        for state in client_states:
            clipped, norm = clip_update(_delta64(state, global_state), self.clip_norm)
            norms.append(norm)
            for name, t in clipped.items():
                total[name] = total[name] + t if name in total else t
        m = self.expected_clients or len(client_states)
        mean = {name: t / m for name, t in total.items()}
        std = self.noise_std(len(client_states))
        if std > 0:
            noise = gaussian_noise_like(mean, std, generator)
            mean = {name: t + noise[name] for name, t in mean.items()}
        stats = {"mean_norm": sum(norms) / len(norms), "noise_std": std, "clients": float(len(client_states)),
                 "clipped_fraction": sum(n > self.clip_norm for n in norms) / len(norms)}
        return _apply(global_state, mean), stats


def privatize_locally(start: State, trained: State, clip_norm: float, noise_multiplier: float,
                      generator: torch.Generator) -> State:
    """``start + clip(trained - start) + N(0, (noise_multiplier * clip_norm)^2)``: what a client uploads.

    Non-float tensors are uploaded with ``start``'s value, so nothing un-noised leaves the client.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
    clipped, _ = clip_update(_delta64(trained, start), clip_norm)
    std = noise_multiplier * clip_norm
    if std > 0:
        noise = gaussian_noise_like(clipped, std, generator)
        clipped = {name: t + noise[name] for name, t in clipped.items()}
    return _apply(start, clipped)


class PrivacyAccountant:
    """Renyi-DP accountant of the Sampled Gaussian Mechanism (opacus), one ``step`` per round.

    See the module docstring for what epsilon means in central and local mode.
    """

    def __init__(self) -> None:
        from opacus.accountants import RDPAccountant  # importing opacus takes ~3 s: only runs with DP pay it

        self._rdp = RDPAccountant()

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one round with noise multiplier ``z`` and client sampling rate ``q``."""
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self._rdp.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    @property
    def steps(self) -> int:
        """Rounds recorded so far."""
        return sum(int(n) for _, _, n in self._rdp.history)

    def epsilon(self, delta: float, orders: Sequence[float] | None = None) -> float:
        """Smallest epsilon over the RDP ``orders`` (opacus' defaults if None) at this ``delta``.

        0.0 before any step; ``inf`` if a round had no noise.
        """
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._rdp.history:
            return 0.0
        alphas = None if orders is None else [float(a) for a in orders]
        return float(self._rdp.get_epsilon(delta=delta, alphas=alphas))

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable history: ``[[noise_multiplier, sample_rate, steps], ...]``."""
        return {"history": [[float(z), float(q), int(n)] for z, q, n in self._rdp.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history written by ``state_dict`` (e.g. from a checkpoint's JSON)."""
        if "history" not in state:
            raise ValueError(f"accountant state: expected a 'history' key, got {sorted(state)}")
        self._rdp.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]
