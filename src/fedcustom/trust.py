"""Wiring of the trust features into a run: which clients attack, what the server enforces (update
limits, DP, secure aggregation), what only some methods and runtimes support, and what the summary
reports about privacy and attackers. The mechanisms themselves live in fedcustom.privacy,
fedcustom.strategies and fedcustom.attacks."""

from __future__ import annotations

from typing import Any

import datasets

from fedcustom.attacks import flip_labels, malicious_clients
from fedcustom.config import RunConfig
from fedcustom.data import FederatedData
from fedcustom.errors import FedCustomError
from fedcustom.methods import Method
from fedcustom.privacy.dp import CentralDP, PrivacyAccountant
from fedcustom.privacy.secure_round import SecureRound
from fedcustom.protocols import require_server_features
from fedcustom.protocols.sharing.aggregation import (
    Aggregation, CentralDPAggregation, SecAggSettings, SecureAggregation, StrategyAggregation,
)
from fedcustom.protocols.sharing.client import Adversary
from fedcustom.protocols.sharing.server import Safeguards
from fedcustom.rounds import RoundResult
from fedcustom.wire import dp_sgd_config, local_dp_config


def clients_per_round(cfg: RunConfig) -> int:
    """Explicit count, else the sampled fraction of clients (at least one)."""
    fed = cfg.federation
    return sampled_per_round(fed.clients, fed.clients_per_round, fed.fraction)


def sampled_per_round(clients: int, per_round: int | None, fraction: float) -> int:
    """:func:`clients_per_round` from the federation's settings themselves (a recorded config's, too)."""
    return per_round or max(1, round(fraction * clients))


def check_trust_support(cfg: RunConfig, method: Method) -> None:
    """Privacy, attacks and simulated faults need the parameter-sharing round; attacks and faults are simulated
    in this process only."""
    fed, priv, adv = cfg.federation, cfg.privacy, cfg.adversary
    asked = [name for name, on in [("--dp", priv.dp != "off"), ("--dp-sgd", priv.dp_sgd), ("--secagg", priv.secagg),
                                   ("--attack", adv.attack != "none"), ("--client-failure-rate", fed.client_failure_rate > 0),
                                   ("--client-latency", fed.client_latency > 0)] if on]
    require_server_features(asked, method)
    if priv.secagg and fed.runtime != "embedded" and clients_per_round(cfg) < 2:
        raise FedCustomError(f"--secagg on --runtime {fed.runtime} runs Flower's SecAgg+, which needs at least 2 clients "
                             f"per round; this run samples {clients_per_round(cfg)}")
    simulated = [name for name in asked if name in ("--attack", "--client-failure-rate", "--client-latency")]
    if simulated and fed.runtime != "embedded":
        raise FedCustomError(f"{', '.join(simulated)}: embedded runtime only (attacks and faults are simulated there; "
                             f"on Flower real nodes fail)")


def secure_round_for(cfg: RunConfig) -> type:
    """How a --secagg round runs: in this process (embedded), or as Flower's SecAgg+ on a Flower runtime."""
    if cfg.federation.runtime == "embedded":
        return SecureRound
    from fedcustom.runtime.flower.secaggplus import SecAggPlusRound  # flwr loads only for Flower runs

    return SecAggPlusRound


def aggregation_for(cfg: RunConfig) -> Aggregation:
    """How the parameter-sharing server collects and merges a round: secure aggregation's masked sum, central DP's
    noised mean of clipped updates, or the strategy's merge (config checks exclude the other combinations)."""
    priv = cfg.privacy
    if priv.secagg:
        return SecureAggregation(SecAggSettings(priv.secagg_clip, priv.secagg_threshold, secure_round_for(cfg)))
    if priv.dp == "central":
        # The textbook fixed denominator (the expected cohort), whose guarantee matches the accountant exactly.
        return CentralDPAggregation(CentralDP(priv.clip_norm, priv.noise_multiplier,
                                              expected_clients=clients_per_round(cfg)), priv.reproducible_noise)
    return StrategyAggregation()


def safeguards_for(cfg: RunConfig) -> Safeguards:
    """Update size limit, what clients are told to privatize, and the privacy accountant."""
    priv, fed = cfg.privacy, cfg.federation
    guards = Safeguards(max_update_bytes=int(fed.max_update_mb * 1e6) if fed.max_update_mb else None)
    if priv.dp_sgd:
        guards.client_config.update(dp_sgd_config(priv.sgd_noise, priv.sgd_clip, priv.delta))
    if priv.dp == "off":
        return guards
    guards.accountant = PrivacyAccountant()
    guards.noise_multiplier, guards.dp_delta = priv.noise_multiplier, priv.delta
    guards.sample_rate = clients_per_round(cfg) / fed.clients if priv.dp == "central" else 1.0
    if priv.dp == "local":
        guards.client_config.update(local_dp_config(priv.clip_norm, priv.noise_multiplier))
    return guards


def client_tables(cfg: RunConfig, data: FederatedData) -> tuple[dict[int, datasets.Dataset], Adversary | None]:
    """Each client's rows (label-flipping attackers get theirs flipped) and the model-poisoning adversary."""
    tables = {i: data.client_table(i) for i in range(cfg.federation.clients)}
    adv = cfg.adversary
    if adv.attack == "none":
        return tables, None
    attackers = malicious_clients(cfg.federation.clients, adv.fraction, cfg.train.seed)
    if adv.attack == "label-flip":
        for node in attackers:
            tables[node] = flip_labels(tables[node], len(data.label_names))
        return tables, None
    return tables, Adversary(adv.attack, adv.scale, frozenset(attackers))


def trust_summary(cfg: RunConfig, results: list[RoundResult]) -> dict[str, Any]:
    """Privacy spent, secure aggregation and simulated attackers, for summary.json."""
    priv, adv = cfg.privacy, cfg.adversary
    out: dict[str, Any] = {"dp": priv.dp, "dp_sgd": priv.dp_sgd, "secagg": priv.secagg}
    if priv.secagg:  # which implementation masked the updates
        out["secagg_protocol"] = "flower-secaggplus" if cfg.federation.runtime != "embedded" else "pairwise-masking"
    if priv.dp_sgd:
        out["dp_sgd_epsilon_per_round"] = [r.privacy.get("dp_sgd_epsilon_max") for r in results[1:]]
    if priv.dp != "off":
        out.update(epsilon=results[-1].epsilon, dp_delta=priv.delta, dp_clip=priv.clip_norm,
                   dp_noise_multiplier=priv.noise_multiplier, epsilon_per_round=[r.epsilon for r in results[1:]])
    if adv.attack != "none":
        out.update(attack=adv.attack, attack_scale=adv.scale,
                   malicious_clients=sorted(malicious_clients(cfg.federation.clients, adv.fraction, cfg.train.seed)))
    return out
