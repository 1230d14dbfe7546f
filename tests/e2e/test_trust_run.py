"""End-to-end runs with the trust features on: DP, attacks against robust strategies, simulated
faults, and checkpoint/resume (in process; tests/e2e/test_resume.py kills a real process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedcustom.attacks import malicious_clients
from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.privacy.dp import PrivacyAccountant, update_norm
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.runner import build_job, execute, resume
from fedcustom.trust import client_tables
from conftest import TINY_LR


def run_job(cfg):
    job = build_job(cfg)
    summary = execute(job)
    return job, summary


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return update_norm({k: a[k].double() - b[k].double() for k in a})


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]


def test_central_dp_reports_the_accountants_epsilon_every_round(tiny_config) -> None:
    # Prepare: 4 clients, 2 sampled per round, noise multiplier 1.1
    cfg = tiny_config(federation__clients=4, federation__clients_per_round=2, federation__rounds=3,
                      privacy__dp="central", privacy__noise_multiplier=1.1, privacy__clip_norm=0.5,
                      train__lr=TINY_LR["prefix"])
    # Execute
    job, summary = run_job(cfg)
    # Assert: epsilon grows each round and equals an accountant stepped with q = 2/4 three times
    reference = PrivacyAccountant()
    expected = []
    for _ in range(3):
        reference.step(1.1, 0.5)
        expected.append(reference.epsilon(1e-5))
    assert summary["epsilon_per_round"] == pytest.approx(expected, rel=1e-9)
    assert summary["epsilon"] == pytest.approx(expected[-1], rel=1e-9)
    lines = log_lines(job.out)
    assert [line["epsilon"] for line in lines[1:]] == pytest.approx(expected, rel=1e-9)
    assert lines[1]["privacy"]["noise_std"] == pytest.approx(1.1 * 0.5 / 2)


@pytest.mark.parametrize("privacy", [
    dict(privacy__dp="local", privacy__noise_multiplier=1.0),
    dict(privacy__dp="central", privacy__noise_multiplier=1.0),
    dict(method__name="lora", privacy__dp_sgd=True, privacy__sgd_noise=1.0),
], ids=["local", "central", "dp-sgd"])
def test_dp_noise_comes_from_the_os_unless_reproducible_noise_is_asked(tiny_config, tmp_path, privacy) -> None:
    # Prepare: one round, the same config and seed three times, the third with --dp-reproducible-noise twice
    settings = dict(federation__rounds=1, train__lr=TINY_LR[privacy.get("method__name", "prefix")], **privacy)

    def global_state(name: str, **extra) -> dict[str, torch.Tensor]:
        job, _ = run_job(tiny_config(**settings, **extra, output__dir=str(tmp_path / name)))
        return job.server.global_state

    # Execute
    first, second = global_state("a"), global_state("b")
    seeded, again = (global_state(n, privacy__reproducible_noise=True) for n in ("c", "d"))
    # Assert: by default nobody, the server included, can regenerate the noise from the run seed it knows: two
    # runs differ; seeded noise repeats exactly (experiments only)
    assert distance(first, second) > 0 and distance(first, seeded) > 0
    assert distance(seeded, again) == 0


def test_local_dp_spends_privacy_in_every_round_the_server_saw_noised_uploads(tiny_config, tmp_path) -> None:
    # Prepare: local DP, 3 clients, min_available 3, client 2 always offline: 2 valid updates a round, never merged
    job = build_job(tiny_config(federation__clients=3, federation__rounds=2, federation__min_available=3,
                                privacy__dp="local", privacy__noise_multiplier=1.0))
    _fail_masked_upload_of(job, 2)
    # Execute
    execute(job)
    # Assert: the model never moved, but the server did see two noised uploads a round: one step each round
    lines = log_lines(job.out)
    assert distance(job.server.global_state, job.initial) == 0
    assert lines[2]["epsilon"] > lines[1]["epsilon"] > 0


def test_local_dp_bounds_how_far_the_global_state_moves(tiny_config) -> None:
    # Prepare: no noise, a tiny clip: each round's mean update has norm <= clip
    clip = 1e-3
    cfg = tiny_config(federation__rounds=2, privacy__dp="local", privacy__noise_multiplier=0.0,
                      privacy__clip_norm=clip, train__lr=TINY_LR["prefix"])
    # Execute
    job, _ = run_job(cfg)
    # Assert: two rounds of clipped updates move the state at most 2 x clip (and it did move)
    moved = distance(job.server.global_state, job.initial)
    assert 0 < moved <= 2 * clip + 1e-6


def test_median_resists_scaled_sign_flips_that_wreck_fedavg(tiny_config) -> None:
    # Prepare: 5 clients, 2 of them send -1000 x their update
    common = dict(federation__clients=5, federation__rounds=1, adversary__attack="sign-flip",
                  adversary__fraction=0.4, adversary__scale=1000.0, train__lr=TINY_LR["prefix"])
    # Execute
    fedavg_job, summary = run_job(tiny_config(**common))
    median_job, _ = run_job(tiny_config(**common, federation__strategy="median",
                                        output__dir=str(Path(fedavg_job.out).parent / "median")))
    # Assert: the same attackers; FedAvg is dragged ~1000x further than the median
    assert summary["malicious_clients"] == sorted(malicious_clients(5, 0.4, 0)) and len(summary["malicious_clients"]) == 2
    dragged = distance(fedavg_job.server.global_state, fedavg_job.initial)
    robust = distance(median_job.server.global_state, median_job.initial)
    assert dragged > 50 * robust > 0


def test_label_flipping_attackers_train_on_flipped_labels(tiny_config) -> None:
    # Prepare
    cfg = tiny_config(federation__clients=4, adversary__attack="label-flip", adversary__fraction=0.5)
    job = build_job(tiny_config(federation__clients=4))
    # Execute
    tables, adversary = client_tables(cfg, job.data)
    # Assert: attackers' labels are flipped (binary task), honest clients' untouched
    attackers = malicious_clients(4, 0.5, 0)
    assert adversary is None and len(attackers) == 2
    for node in range(4):
        honest = job.data.client_table(node)["labels"]
        got = tables[node]["labels"]
        assert got == ([1 - y for y in honest] if node in attackers else honest)


def test_simulated_failures_and_stragglers_leave_the_round_with_reasons(tiny_config) -> None:
    # Prepare: half the clients fail; a mean latency far above the deadline makes most others stragglers
    cfg = tiny_config(federation__clients=6, federation__rounds=2, federation__client_failure_rate=0.5,
                      federation__client_latency=10.0, federation__round_timeout=8.0)
    # Execute
    job, summary = run_job(cfg)
    # Assert: every missing client has its reason; the run finished; the same seed drops the same clients
    lines = log_lines(job.out)
    reasons = [reason for line in lines[1:] for reason in line["rejected"].values()]
    assert any("simulated client failure" in r for r in reasons)
    assert any(r.startswith("client reported an error: straggler: simulated latency") for r in reasons)
    assert summary["rejected_updates"] == len(reasons) < 12
    # a client that never answered uploaded nothing: the mean upload is over those that did (all the same size)
    sizes = {b for line in lines[1:] for b in line["bytes_up"].values() if b > 0}
    assert len(sizes) == 1 and summary["bytes_up_per_round"] == sizes.pop()
    _, again = run_job(tiny_config(federation__clients=6, federation__rounds=2, federation__client_failure_rate=0.5,
                                   federation__client_latency=10.0, federation__round_timeout=8.0,
                                   output__dir=str(job.out.parent / "again")))
    assert again["accuracy_per_round"] == summary["accuracy_per_round"]


class Interrupted(Exception):
    pass


def run_interrupted(cfg, server_type: type, crash_round: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``cfg`` until ``server_type`` starts round ``crash_round``, which raises Interrupted (the checkpoint of the
    round before stays on disk)."""
    original = server_type.run_round

    def crash(self, rnd, on_reply=None):
        if rnd == crash_round:
            raise Interrupted
        return original(self, rnd, on_reply)

    monkeypatch.setattr(server_type, "run_round", crash)
    with pytest.raises(Interrupted):
        run_job(cfg)
    monkeypatch.setattr(server_type, "run_round", original)


def test_resume_after_an_interrupted_round_gives_the_uninterrupted_result(tiny_config, tmp_path, monkeypatch) -> None:
    # Prepare: stateful codecs on both links (delta references, top-k residuals), 3 clients, 3 rounds
    settings = dict(federation__clients=3, federation__rounds=3, codec__up="delta,topk:0.5",
                    privacy__dp="central", privacy__noise_multiplier=0.3, privacy__clip_norm=5.0,
                    privacy__reproducible_noise=True, train__lr=TINY_LR["prefix"])  # (exact only with seeded noise)
    whole, summary = run_job(tiny_config(**settings, output__dir=str(tmp_path / "whole")))
    run_interrupted(tiny_config(**settings, output__dir=str(tmp_path / "cut")), FederatedServer, 2, monkeypatch)
    # Execute
    resumed = resume(str(tmp_path / "cut"))
    # Assert: the same global tensors, accuracies, byte counts and privacy spent
    from safetensors.torch import load_file

    def adapter(folder: str) -> dict[str, torch.Tensor]:
        return load_file(tmp_path / folder / "adapter" / "adapter_model.safetensors")

    a, b = adapter("whole"), adapter("cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("accuracy_per_round", "epsilon_per_round", "bytes_up_total", "bytes_down_total"):
        assert resumed[key] == summary[key], key
    cut_log = log_lines(tmp_path / "cut")
    assert [line["round"] for line in cut_log] == [0, 1, 2, 3]
    assert [line["bytes_up"] for line in cut_log] == [line["bytes_up"] for line in log_lines(whole.out)]


@pytest.mark.parametrize("method", [
    {"method__name": "split", "method__cut_layer": 1, "method__split_head": "client"},
    {"method__name": "distill", "method__public_size": 40, "data__max_train_examples": 150},
], ids=["split", "distill"])
def test_split_and_distill_runs_resume_to_the_uninterrupted_result(tiny_config, tmp_path, monkeypatch, method) -> None:
    """Their servers' own state (split: both global halves and the server optimizer's moments; distill: the global
    tensors, the next broadcast, and each embedded client's own model) goes into the checkpoint."""
    settings = dict(federation__rounds=3, federation__local_epochs=1, train__lr=3e-3, **method)
    whole, summary = run_job(tiny_config(**settings, output__dir=str(tmp_path / "whole")))
    run_interrupted(tiny_config(**settings, output__dir=str(tmp_path / "cut")), type(whole.server), 3, monkeypatch)
    # Execute
    resumed = resume(str(tmp_path / "cut"))
    # Assert: the same round log (but wall times) and final accuracy as the run that was never interrupted; split's
    # resumed round sends each node its client half whole (the versions the nodes kept went with their process), so
    # only its bytes down differ, and are larger
    moved = ("bytes_down",) if method["method__name"] == "split" else ()

    def without_times(lines: list[dict]) -> list[dict]:
        return [{k: v for k, v in line.items() if k not in ("wall_seconds", "memory", *moved)} for line in lines]

    cut, uninterrupted = log_lines(tmp_path / "cut"), log_lines(whole.out)
    assert without_times(cut) == without_times(uninterrupted)
    assert resumed["accuracy_per_round"] == summary["accuracy_per_round"]
    for key in moved:
        assert [line[key] for line in cut[:3]] == [line[key] for line in uninterrupted[:3]]
        assert all(cut[3][key][node] > uninterrupted[3][key][node] for node in uninterrupted[3][key])


def test_resume_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(FedCustomError, match="no checkpoint.safetensors"):
        resume(str(tmp_path))
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(FedCustomError, match="not a fedcustom checkpoint"):
        resume(str(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    (dict(privacy__dp="central", federation__strategy="median"), "central DP replaces the merge"),
    (dict(privacy__secagg=True, federation__strategy="krum:1"), "only fedavg"),
    (dict(adversary__fraction=1.5), "adversary.fraction"),
    (dict(federation__strategy="krum:x"), "krum:x"),
    (dict(privacy__delta=2.0), "privacy.delta"),
])
def test_bad_trust_settings_are_refused_clearly(tiny_config, overrides, message) -> None:
    with pytest.raises((ConfigError, FedCustomError), match=message):
        tiny_config(**overrides)


def test_attacks_are_refused_for_split_learning(tiny_config) -> None:
    cfg = tiny_config(method__name="split", method__cut_layer=1, adversary__attack="scale", adversary__fraction=0.5)
    with pytest.raises(FedCustomError, match="parameter-sharing methods"):
        build_job(cfg)


def _fail_masked_upload_of(job, node: int) -> None:
    """Make ``node`` vanish after secure aggregation's key sharing (it never sends its masked update)."""
    runtime = job.server.runtime
    handler = runtime._handler

    def flaky(node_id, message):
        if node_id == node and message.kind in ("train", "train_secagg"):
            raise ConnectionError("client went offline")
        return handler(node_id, message)

    runtime._handler = flaky


@pytest.mark.parametrize("drop", [None, 1])
def test_secure_aggregation_gives_fedavg_without_seeing_an_update(tiny_config, tmp_path, drop) -> None:
    # Prepare: the same job with and without secure aggregation; optionally client 1 drops after sharing keys
    settings = dict(federation__clients=4, federation__rounds=1, train__lr=TINY_LR["prefix"])
    plain = build_job(tiny_config(**settings, output__dir=str(tmp_path / "plain")))
    secure = build_job(tiny_config(**settings, privacy__secagg=True, output__dir=str(tmp_path / "secure")))
    if drop is not None:
        _fail_masked_upload_of(plain, drop)
        _fail_masked_upload_of(secure, drop)
    # Execute
    plain_summary, secure_summary = execute(plain), execute(secure)
    # Assert: the same global state up to the fixed-point step; the dropped client's masks were removed
    a, b = plain.server.global_state, secure.server.global_state
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert distance(b, secure.initial) > 1e-3
    line = log_lines(secure.out)[1]
    assert set(line["rejected"]) == ({str(drop)} if drop is not None else set())
    assert secure_summary["secagg"] and plain_summary["rejected_updates"] == secure_summary["rejected_updates"]
    numel = sum(t.numel() for t in secure.initial.values())
    assert all(b >= 4 * numel for n, b in line["bytes_up"].items() if n != str(drop))  # 4-byte ring values


def test_a_client_lost_only_at_unmasking_is_in_the_sum_and_not_rejected(tiny_config, tmp_path) -> None:
    # Prepare: 4 clients (threshold 3); client 1 sends its masked update, then fails the unmask stage
    from fedcustom.privacy.secagg import UNMASK

    settings = dict(federation__clients=4, federation__rounds=1, train__lr=TINY_LR["prefix"])
    plain = build_job(tiny_config(**settings, output__dir=str(tmp_path / "plain")))
    secure = build_job(tiny_config(**settings, privacy__secagg=True, output__dir=str(tmp_path / "secure")))
    handler = secure.server.runtime._handler

    def lost_at_unmask(node_id, message):
        if node_id == 1 and message.kind == UNMASK:
            raise ConnectionError("client went offline")
        return handler(node_id, message)

    secure.server.runtime._handler = lost_at_unmask
    # Execute
    execute(plain), execute(secure)
    # Assert: the others' shares remove its masks, so its update is in the mean (= FedAvg of all 4), not rejected
    a, b = plain.server.global_state, secure.server.global_state
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert log_lines(secure.out)[1]["rejected"] == {}


def test_secure_aggregation_aborts_cleanly_below_threshold(tiny_config, tmp_path) -> None:
    # Prepare: 3 clients, threshold 100%: one dropout after key sharing aborts the round
    job = build_job(tiny_config(federation__clients=3, federation__rounds=1, privacy__secagg=True,
                                privacy__secagg_threshold=1.0))
    _fail_masked_upload_of(job, 2)
    # Execute
    summary = execute(job)
    # Assert: the round is logged as aborted for everyone and the global state is untouched
    assert distance(job.server.global_state, job.initial) == 0
    rejected = log_lines(job.out)[1]["rejected"]
    assert "client went offline" in rejected["2"]
    assert all("aborted: 2 clients sent masked inputs, threshold is 3" in rejected[n] for n in "01")
    assert summary["rejected_updates"] == 3
    assert log_lines(job.out)[1]["examples_seen"] == 0  # no pass reached the model: none for the baseline's budget


def test_dp_sgd_trains_privately_and_reports_each_clients_record_level_epsilon(tiny_config) -> None:
    # Prepare: LoRA with DP-SGD; 2 clients, one sampled per round, 4 rounds of 1 local epoch, batch 16
    settings = dict(method__name="lora", train__lr=TINY_LR["lora"], federation__local_epochs=1,
                    federation__rounds=4, federation__clients_per_round=1)
    cfg = tiny_config(**settings, privacy__dp_sgd=True, privacy__sgd_noise=1.2, privacy__sgd_clip=0.5)
    # Execute
    job, summary = run_job(cfg)
    plain, _ = run_job(tiny_config(**settings, output__dir=str(job.out.parent / "plain")))
    # Assert: epsilon of the most exposed client, over every client so far (not only the round's), equals an
    # accountant fed each client's steps in the rounds it took part in (q = batch / rows)
    expected = []
    accountants = {n: PrivacyAccountant() for n in range(2)}
    for line in log_lines(job.out)[1:]:
        for node in line["clients"]:
            rows = len(job.data.client_indices[node])
            for _ in range(-(-rows // 16)):
                accountants[node].step(1.2, 16 / rows)
        expected.append(max(a.epsilon(1e-5) for a in accountants.values() if a.steps))
    assert summary["dp_sgd"] and summary["dp_sgd_epsilon_per_round"] == pytest.approx(expected, rel=1e-9)
    assert expected == sorted(expected)
    # Assert: the noise and clipping changed the training, and the backbone is left without Opacus hooks
    assert distance(job.server.global_state, plain.server.global_state) > 1e-4
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in job.model.parameters())


def test_dp_sgd_is_refused_where_opacus_cannot_compute_per_example_gradients(tiny_config) -> None:
    with pytest.raises(ConfigError, match="--dp-sgd with --method prompt"):
        tiny_config(method__name="prompt", privacy__dp_sgd=True)
