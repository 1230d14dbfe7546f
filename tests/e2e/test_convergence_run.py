"""Whole runs with the convergence features: server optimizers and SCAFFOLD resumed after an interruption, the
client rate schedule, early stopping, both centralized baselines, the recorded settings and clear refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedcustom.codecs import RawCodec
from fedcustom.convergence import EarlyStop
from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.methods import get_method
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.rounds import RoundResult
from fedcustom.runner import build_job, resume
from fedcustom.runtime import EmbeddedRuntime, Message, Reply
from fedcustom.strategies import FedAvg
from fedcustom.training import LocalSchedule, lr_multiplier

from conftest import TINY_LR
from test_trust_run import log_lines, run_interrupted, run_job


def test_resume_with_a_server_optimizer_and_scaffold_gives_the_uninterrupted_result(tiny_config, tmp_path,
                                                                                   monkeypatch) -> None:
    # Prepare: yogi's moments, the server's and each client's control variates, and a delta codec's references
    settings = dict(federation__clients=3, federation__rounds=3, federation__server_opt="yogi",
                    federation__server_lr=0.05, federation__scaffold=True, codec__up="delta,zstd",
                    train__lr=TINY_LR["prefix"], train__lr_schedule="cosine", federation__fraction=0.67)
    whole, summary = run_job(tiny_config(**settings, output__dir=str(tmp_path / "whole")))
    run_interrupted(tiny_config(**settings, output__dir=str(tmp_path / "cut")), FederatedServer, 3, monkeypatch)
    # Execute
    resumed = resume(str(tmp_path / "cut"))
    # Assert: bit-identical adapter and the same round log but wall times
    a, b = (load_file(tmp_path / f / "adapter" / "adapter_model.safetensors") for f in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda lines: [{k: v for k, v in line.items() if k not in ("wall_seconds", "memory")} for line in lines]  # noqa: E731
    for x, y in zip(strip(log_lines(tmp_path / "cut")), strip(log_lines(whole.out))):
        assert x == y, {k: (x[k], y[k]) for k in x if x[k] != y[k]}
    assert resumed["accuracy_per_round"] == summary["accuracy_per_round"]
    assert summary["settings"]["server_opt"] == "yogi" and summary["settings"]["scaffold"] is True


def test_the_client_rate_follows_warmup_then_decay_round_by_round() -> None:
    # Prepare: a server that records the rate each train message carries
    seen: list[float] = []
    codec = RawCodec()

    def handler(node: int, message: Message) -> Reply:
        seen.append(float(message.config["lr"]))
        return Reply(message.payload, 4, {"train_loss": 0.1}, round=message.round)

    schedule = LocalSchedule(lr=0.1, batch_size=4, decay="cosine", warmup_rounds=2, rounds=6)
    server = FederatedServer(EmbeddedRuntime(handler, 1), FedAvg(), codec, {"w": torch.zeros(2)},
                             lambda s: {"accuracy": 0.0}, schedule, clients_per_round=1, seed=0)
    # Execute
    for rnd in range(1, 7):
        server.run_round(rnd)
    # Assert: 1/3, 2/3 of the rate while warming up, then cosine from the full rate, never reaching zero
    assert seen[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert seen[2:] == sorted(seen[2:], reverse=True) and seen[-1] > 0
    assert lr_multiplier("linear", 0, 4, 3) == pytest.approx(0.5) and lr_multiplier("constant", 0, 4, 4) == 1.0


def test_a_round_below_min_available_leaves_the_model_and_the_baselines_budget_unchanged() -> None:
    # Prepare: 3 clients each adding 1 to w from 4 examples; client 2 fails in round 1; min_available 3
    codec = RawCodec()

    def handler(node: int, message: Message) -> Reply:
        if node == 2 and message.round == 1:
            return Reply(error="offline")
        state = {"w": codec.decode(message.payload)["w"] + 1}
        return Reply(codec.encode(state), 4, {"train_loss": 0.1, "examples_seen": 4}, round=message.round)

    server = FederatedServer(EmbeddedRuntime(handler, 3), FedAvg(), codec, {"w": torch.zeros(2)},
                             lambda s: {"accuracy": 0.0}, LocalSchedule(lr=0.1, batch_size=4), clients_per_round=3,
                             seed=0, min_available=3)
    # Execute
    first, second = server.run_round(1), server.run_round(2)
    # Assert: round 1's two valid updates changed nothing, so its passes are no part of the same-passes budget
    assert first.examples_seen == 0 and second.examples_seen == 12
    assert torch.equal(server.global_state["w"], torch.ones(2))


def test_early_stopping_ends_the_run_and_says_so(tiny_config) -> None:
    # Prepare: a rate so small that accuracy cannot move
    cfg = tiny_config(federation__rounds=6, federation__early_stop_patience=2, train__lr=1e-12)
    # Execute
    job, summary = run_job(cfg)
    # Assert
    assert [line["round"] for line in log_lines(job.out)] == [0, 1, 2]
    assert summary["rounds"] == 2
    assert summary["early_stop"] == {"metric": "accuracy", "patience": 2, "min_delta": 0.0, "min_rounds": 0, "stopped": True,
                                     "last_round": 2, "best_round": 0, "best_accuracy": summary["initial_accuracy"],
                                     "saved_round": 2}


def test_early_stop_rule_counts_rounds_since_the_best() -> None:
    rule = EarlyStop("accuracy", True, patience=2, min_delta=0.01)
    results = [RoundResult(i, {"accuracy": a}) for i, a in enumerate([0.5, 0.6, 0.605, 0.609])]
    assert rule.best_round(results) == 1 and rule.should_stop(results)
    assert not rule.should_stop(results[:3])
    # not before round min_rounds: the same rounds go on until round 4, then stop as before
    warming = EarlyStop("accuracy", True, patience=2, min_delta=0.01, min_rounds=4)
    assert not warming.should_stop(results)
    flat = results + [RoundResult(4, {"accuracy": 0.6})]
    assert warming.should_stop(flat) and warming.best_round(flat) == 1


def test_both_centralized_baselines_are_reported_with_their_gaps(tiny_config) -> None:
    # Prepare
    cfg = tiny_config(train__lr=TINY_LR["prefix"], train__centralized=True, train__centralized_converged=True,
                      train__centralized_max_epochs=6, train__centralized_patience=2)
    # Execute
    _, summary = run_job(cfg)
    # Assert
    same, converged = summary["centralized"], summary["centralized_converged"]
    assert summary["gap_same_passes"] == pytest.approx(summary["final_accuracy"] - same["accuracy"])
    assert summary["gap_converged"] == pytest.approx(summary["final_accuracy"] - converged["accuracy"])
    scores = converged["validation_scores"]
    assert converged["epochs"] == len(scores) - 1 <= 6
    assert scores[converged["best_epoch"]] == max(scores)
    assert converged["training_rows"] + converged["validation_rows"] == summary["train_examples"]


def test_unset_settings_come_from_the_method_and_are_recorded(tiny_config) -> None:
    cfg = tiny_config(federation__local_epochs=None, train__lr=None)
    job = build_job(cfg)
    recommended = get_method("prefix").recommended(cfg.method, "classification")
    assert job.schedule.epochs == recommended.local_epochs and job.schedule.lr == recommended.lr


@pytest.mark.parametrize("overrides, message", [
    (dict(federation__scaffold=True, privacy__secagg=True), "--scaffold with --secagg"),
    (dict(federation__scaffold=True, privacy__dp="local"), "--scaffold with --secagg or --dp"),
    (dict(federation__scaffold=True, federation__strategy="median"), "--scaffold with --strategy median: every"),
    (dict(federation__scaffold=True, federation__scaffold_weights="examples", federation__clients=4,
          federation__fraction=0.5), "--scaffold-weights examples with clients sampled per round"),
    (dict(federation__prox_mu=0.1, privacy__dp_sgd=True, method__name="lora"), "--prox-mu with --dp-sgd"),
    (dict(federation__server_opt="adam", method__name="split", method__cut_layer=1), "parameter-sharing"),
    (dict(federation__server_betas=[0.9]), "server_betas"),
    (dict(federation__server_betas="0.9,1.5"), "server_betas"),
    (dict(train__warmup_rounds=2), "warmup_rounds"),
    (dict(federation__prox_mu=-1.0), "prox_mu"),
    (dict(federation__early_stop_min_rounds=-2), r"early_stop_min_rounds \(--early-stop-min-rounds\): expected"),
    (dict(federation__server_opt="sgd"), "server_opt"),
    (dict(method__prefix_init="words"), "prefix_init"),
])
def test_bad_convergence_settings_are_refused_clearly(tiny_config, overrides, message) -> None:
    with pytest.raises((ConfigError, FedCustomError), match=message):
        build_job(tiny_config(**overrides))


def test_scaffold_weighs_by_examples_by_default_when_every_client_trains_every_round(tiny_config) -> None:
    # Prepare / Execute: the auto default, on full and on sampled participation, and the paper's rule asked for
    from fedcustom.convergence import convergence_for, local_schedule, resolved_settings

    def rule(**overrides):  # type: ignore[no-untyped-def]
        cfg = tiny_config(**overrides)
        method = get_method(cfg.method.name)
        schedule = local_schedule(cfg, method)
        return convergence_for(cfg, method, schedule).scaffold_weights, \
            resolved_settings(cfg, method, schedule)["scaffold_weights"]

    # Assert: examples with every client every round (what the model's merge weighs by), uniform for sampled
    # clients (examples refuses those) and without SCAFFOLD; an explicit rule is kept
    assert tiny_config().federation.scaffold_weights == "auto"
    assert rule(federation__scaffold=True) == ("examples", "examples")
    assert rule(federation__scaffold=True, federation__clients=4, federation__fraction=0.5) == ("uniform", "uniform")
    assert rule() == ("uniform", "uniform")
    assert rule(federation__scaffold=True, federation__scaffold_weights="uniform") == ("uniform", "uniform")
    build_job(tiny_config(federation__scaffold=True, federation__clients=4, federation__fraction=0.5))  # not refused
