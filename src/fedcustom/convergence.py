"""Wiring of what makes a federated run converge: the method's recommended settings where the config leaves
them unset, the server optimizer, client-drift correction (FedProx, SCAFFOLD), the client learning-rate
schedule and early stopping. The mechanisms live in fedcustom.strategies.server_opt, fedcustom.training and
fedcustom.scaffold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedcustom.config import RunConfig
from fedcustom.errors import FedCustomError
from fedcustom.methods import Method, get_method
from fedcustom.protocols import require_server_features
from fedcustom.protocols.sharing.server import Convergence
from fedcustom.rounds import RoundResult
from fedcustom.strategies.server_opt import ServerOptimizer, ServerOptSettings
from fedcustom.training import LocalSchedule

# Server rate of the adaptive optimizers as a multiple of the client rate when none is given: each round the
# server then moves every coordinate by about this many client steps (Reddi et al. tune it per task).
ADAPTIVE_SERVER_LR_FACTOR = 1.0


def local_schedule(cfg: RunConfig, method: Method) -> LocalSchedule:
    """The per-round client schedule: the method's recommended rate and epochs unless the config sets them."""
    fed, train = cfg.federation, cfg.train
    recommended = method.recommended(cfg.method, cfg.model.task)
    return LocalSchedule(
        lr=train.lr or recommended.lr, batch_size=train.batch_size,
        epochs=fed.local_epochs or recommended.local_epochs, steps=fed.local_steps,
        weight_decay=train.weight_decay, count_flops=train.count_flops, optimizer=train.optimizer,
        decay=train.lr_schedule, warmup_rounds=train.warmup_rounds, rounds=fed.rounds, precision=train.precision,
    )


def server_opt_settings(cfg: RunConfig, method: Method, client_lr: float) -> ServerOptSettings:
    """The server optimizer: the config's, else the method's recommended one, with its rate."""
    fed = cfg.federation
    recommended = method.recommended(cfg.method, cfg.model.task)
    name = fed.server_opt or recommended.server_opt
    lr = fed.server_lr
    if lr is None and fed.server_opt in (None, recommended.server_opt):
        lr = recommended.server_lr
    if lr is None:
        lr = 1.0 if name in ("fedavg", "avgm") else ADAPTIVE_SERVER_LR_FACTOR * client_lr
    beta1, beta2 = fed.server_betas
    return ServerOptSettings(name, lr, fed.server_momentum, beta1, beta2, fed.server_eps)


def scaffold_weights(cfg: RunConfig) -> str:
    """How SCAFFOLD's server control variate weighs the clients' changes: the config's, or for ``auto`` by examples
    when every client trains every round (the rule refuses sampled clients) and uniformly otherwise."""
    fed = cfg.federation
    return resolve_scaffold_weights(fed.scaffold_weights, fed.scaffold, fed.clients, fed.clients_per_round,
                                    fed.fraction)


def resolve_scaffold_weights(weights: str, scaffold: bool, clients: int, per_round: int | None,
                             fraction: float) -> str:
    """:func:`scaffold_weights` from the federation's settings themselves (a recorded config's, too)."""
    from fedcustom.trust import sampled_per_round

    if weights != "auto":
        return weights
    return "examples" if scaffold and sampled_per_round(clients, per_round, fraction) >= clients else "uniform"


def convergence_for(cfg: RunConfig, method: Method, schedule: LocalSchedule) -> Convergence:
    """What the parameter-sharing server applies besides its strategy."""
    fed = cfg.federation
    return Convergence(ServerOptimizer(server_opt_settings(cfg, method, schedule.lr)), fed.scaffold, fed.prox_mu,
                       clients=fed.clients, scaffold_weights=scaffold_weights(cfg))


def check_convergence_support(cfg: RunConfig, method: Method) -> None:
    """Server optimizers and drift correction need the parameter-sharing round; SCAFFOLD's control variates
    travel in the clear, so it does not combine with secure aggregation or client-level DP."""
    fed, priv = cfg.federation, cfg.privacy
    asked = [name for name, on in [("--server-opt", fed.server_opt not in (None, "fedavg")),
                                   ("--server-lr", fed.server_lr is not None), ("--prox-mu", fed.prox_mu > 0),
                                   ("--scaffold", fed.scaffold)] if on]
    require_server_features(asked, method)
    if fed.scaffold and (priv.secagg or priv.dp != "off"):
        raise FedCustomError("--scaffold with --secagg or --dp: each client's control-variate change travels in the "
                             "clear beside its update and would reveal what secure aggregation and DP hide")
    if fed.scaffold and fed.strategy != "fedavg":
        raise FedCustomError(f"--scaffold with --strategy {fed.strategy}: every accepted client's control-variate "
                             "change is added to the server's c unfiltered, so one malicious client could poison the "
                             "correction every client applies whatever the robust merge of the models; use fedavg")
    if fed.scaffold and fed.scaffold_weights == "examples":
        from fedcustom.trust import clients_per_round

        if clients_per_round(cfg) < fed.clients:
            raise FedCustomError("--scaffold-weights examples with clients sampled per round: c is built from each "
                                 "round's changes weighted among that round's clients, so a client's weight in c would "
                                 "depend on whom it happened to train with; sample every client (--fraction 1) or "
                                 "use --scaffold-weights uniform")
    if fed.prox_mu > 0 and priv.dp_sgd:
        raise FedCustomError("--prox-mu with --dp-sgd: Opacus computes each step from per-example gradients of the "
                             "loss alone, so the proximal term would be dropped; use --scaffold or leave --prox-mu 0")


def resolved_settings(cfg: RunConfig, method: Method, schedule: LocalSchedule) -> dict[str, Any]:
    """The training settings the run used after defaults were filled in (for summary.json)."""
    opt = server_opt_settings(cfg, method, schedule.lr)
    return {"client_lr": schedule.lr, "local_epochs": schedule.epochs, "local_steps": schedule.steps,
            "batch_size": schedule.batch_size, "optimizer": schedule.optimizer, "lr_schedule": schedule.decay,
            "warmup_rounds": schedule.warmup_rounds, "server_opt": opt.name, "server_lr": opt.lr,
            "prox_mu": cfg.federation.prox_mu, "scaffold": cfg.federation.scaffold,
            "scaffold_weights": scaffold_weights(cfg)}


def moved_settings(recorded: dict[str, Any] | None, cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """The training settings a run resolved (``recorded``: summary.json's or a checkpoint's ``settings``) that
    ``cfg`` resolves differently now, as ``{key: (recorded, now)}``: a config that leaves the rate to the
    method's recommended default is the same config after that default has moved, but not the same run. Keys the
    run did not record (it predates them), and runs that recorded none, are not compared."""
    if not isinstance(recorded, dict):
        return {}
    method = get_method(cfg.method.name)
    current = json.loads(json.dumps(resolved_settings(cfg, method, local_schedule(cfg, method))))  # as recorded
    return {key: (recorded[key], value) for key, value in current.items() if key in recorded and recorded[key] != value}


@dataclass(frozen=True)
class EarlyStop:
    """Stop once the headline metric has not improved by more than ``min_delta`` for ``patience`` rounds, but not
    before round ``min_rounds`` (a method whose first rounds do not improve yet is not cut off while it warms up)."""

    metric: str
    higher_is_better: bool
    patience: int
    min_delta: float = 0.0
    min_rounds: int = 0

    def best_round(self, results: list[RoundResult]) -> int:
        """The round (0 = initial model) whose metric is the best so far; the earliest on ties."""
        best = 0
        for i, result in enumerate(results):
            if self._better(result.eval[self.metric], results[best].eval[self.metric]):
                best = i
        return results[best].round

    def should_stop(self, results: list[RoundResult]) -> bool:
        """True when the last ``patience`` rounds brought no improvement over the best before them (and the run has
        reached ``min_rounds``)."""
        last = results[-1].round
        return last >= self.min_rounds and last - self.best_round(results) >= self.patience

    def _better(self, value: float, than: float) -> bool:
        gain = value - than if self.higher_is_better else than - value
        return gain > self.min_delta
