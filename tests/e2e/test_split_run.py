"""`fedcustom run --method split`: SplitFed through the runner, logged, summarized and saved like every method."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedcustom.errors import ConfigError
from fedcustom.runner import build_job, execute


def test_split_run_learns_logs_both_sides_and_saves_a_loadable_model(tiny_config) -> None:
    # Prepare
    cfg = tiny_config(method__name="split", method__cut_layer=1, train__lr=3e-3, federation__rounds=3,
                      federation__local_epochs=1, train__centralized=True)
    job = build_job(cfg)
    # Execute
    summary = execute(job)
    # Assert: it learns, and the centralized baseline ran with the same example passes
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1, 2, 3]
    assert log[3]["eval_loss"] < log[0]["eval_loss"]
    assert summary["centralized"]["examples_seen"] == sum(r["examples_seen"] for r in log[1:]) > 0
    # Assert: bytes and FLOPs of both parties are in the round log and the summary
    assert all(set(r["bytes_up"]) == set(r["server_flops"]) == {"0", "1"} for r in log[1:])
    assert summary["bytes_up_per_round"] > 0 and summary["bytes_down_per_round"] > 0
    assert summary["client_flops_per_round"] > 0 and summary["server_flops_per_round"] > 0
    # Assert: the saved global model is the one evaluated, loadable with plain transformers
    loaded = AutoModelForSequenceClassification.from_pretrained(job.model_dir).eval()
    batch = job.tokenizer(["the movie was great", "the plot was awful"], return_tensors="pt", padding=True)
    job.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, job.model(**batch).logits, rtol=0, atol=1e-6)


def test_split_same_seed_gives_identical_global_model(tiny_config, tmp_path) -> None:
    states = []
    for i in range(2):
        job = build_job(tiny_config(method__name="split", method__cut_layer=1, train__lr=3e-3,
                                    federation__local_epochs=1, output__dir=str(tmp_path / f"run{i}")))
        execute(job)
        states.append(job.server.global_state)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_split_cut_outside_the_model_fails_before_training(tiny_config) -> None:
    with pytest.raises(ConfigError, match="--cut-layer 2: expected 1 to 1"):
        build_job(tiny_config(method__name="split", method__cut_layer=2))


def test_rounds_table_shows_server_flops_only_when_the_server_trained() -> None:
    from rich.console import Console

    from fedcustom.report import rounds_table
    from fedcustom.rounds import RoundResult

    def render(result: RoundResult) -> str:
        console = Console(width=200, record=True)
        console.print(rounds_table([RoundResult(0, {"accuracy": 0.5, "macro_f1": 0.5}), result], None))
        return console.export_text()

    evaluation = {"accuracy": 0.75, "macro_f1": 0.7}
    split = RoundResult(1, evaluation, [0], 0.5, {0: 10}, {0: 10}, {0: 2_000}, server_flops={0: 3_000})
    sharing = RoundResult(1, evaluation, [0], 0.5, {0: 10}, {0: 10}, {0: 2_000})
    assert "server FLOPs / client" in render(split) and "3.000e+03" in render(split)
    assert "server FLOPs" not in render(sharing)


def _assert_learned_and_reloads(job, loaded: torch.nn.Module, atol: float) -> None:
    """The training loss of round 3 is below round 1's, and ``loaded`` (the saved model) gives the job's logits."""
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert log[3]["train_loss"] < log[1]["train_loss"]
    batch = job.tokenizer(["the movie was great", "the plot was awful"], return_tensors="pt", padding=True)
    job.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, job.model(**batch).logits, rtol=0, atol=atol)


def test_lora_on_the_client_half_sends_only_adapters_and_saves_a_merged_model(tiny_config) -> None:
    # Prepare
    job = build_job(tiny_config(method__name="split", method__cut_layer=1, method__split_client="lora",
                                train__lr=3e-3, federation__rounds=3, federation__local_epochs=1))
    embeddings = {n: p.detach().clone() for n, p in job.model.named_parameters() if "embeddings" in n}
    full_half = sum(p.numel() for n, p in job.model.named_parameters() if "embeddings" in n or "layer.0." in n)
    # Execute
    execute(job)
    # Assert: the client half that is averaged and sent is LoRA on layer 0 only; embeddings stay frozen
    client_half = job.server.inner.global_client_half
    assert client_half and all("lora_" in n and "layer.0." in n for n in client_half)
    assert sum(t.numel() for t in client_half.values()) < full_half / 10
    assert all(torch.equal(p, embeddings[n]) for n, p in job.model.named_parameters() if n in embeddings)
    # Assert: it learns, and the saved model is a plain transformers model with the LoRA merged in
    _assert_learned_and_reloads(job, AutoModelForSequenceClassification.from_pretrained(job.model_dir), atol=1e-5)


def test_prefix_on_the_client_half_sends_only_prefixes_and_saves_a_loadable_model(tiny_config) -> None:
    # Prepare
    from fedcustom.methods.split import SplitPrefixModel

    job = build_job(tiny_config(method__name="split", method__cut_layer=1, method__split_client="prefix",
                                train__lr=3e-3, federation__rounds=3, federation__local_epochs=1))
    frozen = {n: p.detach().clone() for n, p in job.model.named_parameters() if "embeddings" in n or "layer.0." in n}
    prefix_before = job.model.client_prefix.weight.detach().clone()
    # Execute
    execute(job)
    # Assert: the averaged client half is the layer-0 prefixes alone; the client's own weights stay frozen
    client_half = job.server.inner.global_client_half
    assert list(client_half) == ["client_prefix.weight"]
    assert client_half["client_prefix.weight"].shape == (1, 2, 4, 4, 8)  # (layers, k/v, heads, tokens, head size)
    assert not torch.equal(client_half["client_prefix.weight"], prefix_before)
    assert all(torch.equal(p, frozen[n]) for n, p in job.model.named_parameters() if n in frozen)
    # Assert: it learns, and the saved backbone and prefixes load back into the same model
    _assert_learned_and_reloads(job, SplitPrefixModel.from_pretrained(job.model_dir), atol=1e-6)


def test_prefix_projection_on_the_client_half_is_a_clear_error(tiny_config) -> None:
    with pytest.raises(ConfigError, match="--prefix-projection: the client half of a split model trains raw"):
        build_job(tiny_config(method__name="split", method__cut_layer=1, method__split_client="prefix",
                              method__prefix_projection=True))


def test_u_shaped_split_keeps_labels_on_the_client_and_learns(tiny_config) -> None:
    # Prepare: record every payload a client sends
    from fedcustom.codecs import RawCodec

    job = build_job(tiny_config(method__name="split", method__cut_layer=1, method__split_head="client",
                                train__lr=3e-3, federation__rounds=3, federation__local_epochs=1))
    handler, uploads = job.server.runtime._handler, []

    def recording(node, message):
        reply = handler(node, message)
        uploads.append((message.kind, RawCodec().decode(reply.payload) if reply.payload else {}))
        return reply

    job.server.runtime._handler = recording
    # Execute
    execute(job)
    # Assert: no upload carries labels; heads travel as hidden states down and gradients up
    assert uploads and not any("labels" in sent for _, sent in uploads)
    assert {kind for kind, _ in uploads} == {"split_begin", "split_head", "split_backward"}
    assert all(set(sent) == {"grad"} for kind, sent in uploads if kind == "split_head")
    assert any("classifier" in name for name in job.server.inner.global_client_half)  # the head is averaged
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert log[3]["eval_loss"] < log[0]["eval_loss"]


@pytest.mark.parametrize("client", ["prefix", "lora"])
def test_u_shaped_split_trains_the_head_beside_a_peft_client_half(tiny_config, client: str) -> None:
    # Prepare: the head on the client, the client half LoRA or prefixes (the head was once left frozen there: a
    # random classifier that never learned)
    job = build_job(tiny_config(method__name="split", method__cut_layer=1, method__split_head="client",
                                method__split_client=client, train__lr=3e-3, federation__rounds=2,
                                federation__local_epochs=1))
    head = {n: p.detach().clone() for n, p in job.model.named_parameters()
            if ("classifier" in n or "pooler" in n) and "original_module" not in n}  # (PEFT's frozen copy)
    # Execute
    execute(job)
    # Assert: the pooler and classifier trained, and travel in the averaged client half
    assert head and all(p.requires_grad for n, p in job.model.named_parameters() if n in head)
    assert any(not torch.equal(p, head[n]) for n, p in job.model.named_parameters() if n in head)
    assert any("classifier" in n for n in job.server.inner.global_client_half)


def test_split_follows_the_runs_rate_schedule_on_both_halves(tiny_config) -> None:
    # Prepare: a linear decay over 2 rounds; record the rate each split_begin carries
    job = build_job(tiny_config(method__name="split", method__cut_layer=1, train__lr=1e-3, train__lr_schedule="linear",
                                federation__rounds=2, federation__local_epochs=1))
    handler, rates = job.server.runtime._handler, []

    def recording(node, message):
        if message.kind == "split_begin":
            rates.append(float(message.config["lr"]))
        return handler(node, message)

    job.server.runtime._handler = recording
    # Execute
    execute(job)
    # Assert: round 2's clients and server half run at half the rate (it once stayed at the base rate)
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(5e-4)
    assert job.server.inner.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
