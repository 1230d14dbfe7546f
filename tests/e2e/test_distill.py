"""KD-FedLLM: soft-label encoding and aggregation, distillation toward clients, exact bytes, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from fedcustom.codecs import RawCodec
from fedcustom.errors import ConfigError, FedCustomError, UpdateRejected
from fedcustom.protocols.distill.knowledge import (
    aggregate_soft_labels, decode_knowledge, distillation_loss, encode_knowledge, public_logits,
)
from fedcustom.protocols.distill.protocol import DistillServer
from fedcustom.runner import build_job, execute
from fedcustom.runtime import Reply

PUBLIC = 40


@pytest.fixture
def kd_config(tiny_config):
    """A KD-FedLLM config on tiny BERT with a 40-row public set outside the clients' 150 rows."""

    def make(**overrides):
        values = {"method__name": "distill", "method__public_size": PUBLIC, "data__max_train_examples": 150,
                  "train__lr": 3e-3, **overrides}
        return tiny_config(**values)

    return make


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q), mean over rows."""
    return float((p * (p.log() - q.log())).sum(-1).mean())


def test_topk_soft_labels_decode_to_distributions_that_keep_the_top_k() -> None:
    # Prepare
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 0.1, 3.0, -2.0]])
    # Execute
    sent = encode_knowledge(logits, topk=2, temperature=1.0)
    soft = decode_knowledge(sent, rows=2, labels=4, temperature=1.0)
    full = decode_knowledge(encode_knowledge(logits, None, 1.0), rows=2, labels=4, temperature=1.0)
    # Assert
    assert sent["topk_indices"].dtype == torch.int16 and sent["topk_probs"].shape == (2, 2)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2))
    torch.testing.assert_close(full, torch.softmax(logits, -1))
    top = full.topk(2, dim=-1)
    torch.testing.assert_close(soft.gather(1, top.indices), top.values)
    rest = (1 - top.values.sum(-1)) / 2  # the remaining mass, spread over the 2 other labels
    mask = torch.ones_like(soft, dtype=torch.bool).scatter_(1, top.indices, False)
    torch.testing.assert_close(soft[mask].view(2, 2), rest.unsqueeze(1).expand(2, 2))
    # renormalized (token-level knowledge over a vocabulary): all the mass on the top k, in the same proportions
    renormalized = decode_knowledge(sent, rows=2, labels=4, temperature=1.0, renormalize=True)
    assert (renormalized[mask] == 0).all()
    torch.testing.assert_close(renormalized.gather(1, top.indices), top.values / top.values.sum(-1, keepdim=True))


def test_aggregation_weights_by_examples_and_by_confidence() -> None:
    # Prepare
    sure = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    unsure = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    # Execute
    by_examples = aggregate_soft_labels([sure, unsure], [3, 1], "examples")
    uniform = aggregate_soft_labels([sure, unsure], [3, 1], "uniform")
    by_confidence = aggregate_soft_labels([sure, unsure], [3, 1], "confidence")
    # Assert
    torch.testing.assert_close(by_examples, (3 * sure + unsure) / 4)
    torch.testing.assert_close(uniform, (sure + unsure) / 2)
    torch.testing.assert_close(by_confidence[0], (0.9 * sure[0] + 0.5 * unsure[0]) / 1.4)
    torch.testing.assert_close(by_confidence[1], (0.5 * sure[1] + 0.8 * unsure[1]) / 1.3)


@pytest.mark.parametrize(("sent", "reason"), [
    ({"logits": torch.zeros(5, 3)}, "client's label space has 3 labels, the server's 2"),
    ({"logits": torch.zeros(4, 2)}, "shape (4, 2), expected (5, 2)"),
    ({"logits": torch.full((5, 2), float("nan"))}, "NaN or Inf"),
    ({"weights": torch.zeros(5, 2)}, "expected ['logits']"),
    ({"topk_probs": torch.full((5, 1), 0.9), "topk_indices": torch.full((5, 1), 7, dtype=torch.int16)}, "label ids"),
    ({"topk_probs": torch.full((5, 1), 1.5), "topk_indices": torch.zeros(5, 1, dtype=torch.int16)}, "summing"),
])
def test_malformed_knowledge_is_rejected_with_the_reason(sent: dict, reason: str) -> None:
    with pytest.raises(UpdateRejected) as err:
        decode_knowledge(sent, rows=5, labels=2, temperature=2.0)
    assert reason in str(err.value)


def test_with_one_client_and_identical_models_distillation_moves_the_global_toward_the_client(kd_config) -> None:
    # Prepare: one client, same backbone and method as the server, so both start from the same model
    job = build_job(kd_config(federation__clients=1, federation__rounds=1, method__local_method="full",
                              method__distill_epochs=10))
    server: DistillServer = job.server
    texts, replies = server.settings.public, {}
    before = torch.softmax(public_logits(job.model, texts, job.tokenizer, 16, 32) / 2.0, -1)
    send = server.runtime.send_and_receive
    server.runtime.send_and_receive = lambda messages, on_reply=None: replies.update(send(messages, on_reply)) or replies
    # Execute
    server.run_round(1)
    # Assert
    client = decode_knowledge(RawCodec().decode(replies[0].payload), PUBLIC, 2, temperature=2.0)
    after = torch.softmax(public_logits(job.model, texts, job.tokenizer, 16, 32) / 2.0, -1)
    assert not torch.allclose(client, before, atol=1e-3)  # local training changed the client's predictions
    assert kl(client, after) < 0.5 * kl(client, before)
    torch.testing.assert_close(server.last_targets, client)  # one client: the average is its soft labels


def test_bytes_are_the_encoded_logits_and_the_broadcast(kd_config) -> None:
    # Prepare
    logits_bytes = len(st_save({"logits": torch.zeros(PUBLIC, 2)}))
    broadcast_bytes = len(st_save({"soft_labels": torch.zeros(PUBLIC, 2)}))
    job = build_job(kd_config(federation__rounds=2))
    # Execute
    execute(job)
    # Assert
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert set(log[1]["bytes_up"].values()) == set(log[2]["bytes_up"].values()) == {logits_bytes}
    assert PUBLIC * 2 * 4 < logits_bytes < PUBLIC * 2 * 4 + 128  # fp32 logits plus the safetensors header
    assert set(log[1]["bytes_down"].values()) == {0}  # round 1: no global knowledge yet
    assert set(log[2]["bytes_down"].values()) == {broadcast_bytes}
    assert all(f > 0 for f in log[2]["server_flops"].values())


def test_topk_upload_and_adapter_broadcast_bytes(kd_config) -> None:
    # Prepare
    topk_bytes = len(st_save({"topk_probs": torch.zeros(PUBLIC, 1), "topk_indices": torch.zeros(PUBLIC, 1, dtype=torch.int16)}))
    job = build_job(kd_config(method__topk=1, method__broadcast="adapter"))
    # Execute
    execute(job)
    # Assert
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    adapter_bytes = len(st_save(job.initial))
    for record in log[1:]:
        assert set(record["bytes_up"].values()) == {topk_bytes}
        assert set(record["bytes_down"].values()) == {adapter_bytes}
    assert PUBLIC * (4 + 2) < topk_bytes < PUBLIC * (4 + 2) + 200  # one fp32 probability and one int16 id per row


def test_heterogeneous_client_backbone_trains_through_logits(kd_config, tiny_llama: str) -> None:
    # Prepare: the server runs tiny BERT, the clients a tiny LLaMA
    job = build_job(kd_config(method__client_model=tiny_llama))
    client = job.server.runtime._handler
    # Execute
    execute(job)
    # Assert
    assert client.model is not job.model
    assert all(any("layers.0" in name for name in state) for state in client.local_states.values())  # LLaMA names
    assert all(name.startswith("base_model.model.bert") or "classifier" in name for name in job.server.global_state)
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert log[2]["rejected"] == {} and len(log[2]["bytes_up"]) == 2


def test_a_corrupt_or_mislabelled_reply_is_rejected_and_the_round_completes(kd_config) -> None:
    # Prepare: client 1 answers garbage in round 1, then logits over three labels in round 2
    job = build_job(kd_config())
    server: DistillServer = job.server
    honest = server.runtime._handler
    bad = {1: Reply(payload=b"not safetensors", num_examples=10),
           2: Reply(payload=RawCodec().encode({"logits": torch.zeros(PUBLIC, 3)}), num_examples=10)}
    server.runtime._handler = lambda node, message: bad[message.round] if node == 1 else honest(node, message)
    start = server.global_state
    # Execute
    first, second = server.run_round(1), server.run_round(2)
    # Assert
    assert set(first.rejected) == {1} and "safetensors" in first.rejected[1]
    assert "label space has 3 labels, the server's 2" in second.rejected[1]
    assert first.bytes_up[0] > 0 and first.client_flops.keys() == {0}
    assert any(not torch.equal(start[k], v) for k, v in server.global_state.items())  # client 0's knowledge was used


def test_a_client_with_another_label_space_refuses_with_a_clear_reason(kd_config) -> None:
    # Prepare
    job = build_job(kd_config())
    client = job.server.runtime._handler
    client.settings = type(client.settings)(**{**client.settings.__dict__, "label_names": ["a", "b", "c"]})
    # Execute
    result = job.server.run_round(1)
    # Assert
    assert set(result.rejected) == {0, 1}
    assert "label space mismatch" in result.rejected[0] and "[a,b,c]" in result.rejected[0]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"method__public_size": 0}, "public_size"),
    ({"method__public_size": 500}, "only 42 rows outside the 150"),
    ({"method__broadcast": "adapter", "method__client_model": "LLAMA"}, "use --broadcast logits"),
])
def test_bad_public_set_or_broadcast_is_a_clear_error(kd_config, tiny_llama: str, overrides: dict, message: str) -> None:
    overrides = {k: (tiny_llama if v == "LLAMA" else v) for k, v in overrides.items()}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_job(kd_config(**overrides))


def test_a_public_dataset_without_rows_is_a_clear_error(kd_config, tmp_path) -> None:
    empty = tmp_path / "public.csv"
    empty.write_text("text\n")
    with pytest.raises(FedCustomError, match="public"):
        build_job(kd_config(method__public_dataset=str(empty)))


def test_distillation_loss_is_zero_only_at_the_target() -> None:
    targets = torch.softmax(torch.tensor([[1.0, -1.0, 0.5]]), -1)
    assert float(distillation_loss(torch.tensor([[1.0, -1.0, 0.5]]) * 2.0, targets, temperature=2.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_loss(torch.zeros(1, 3), targets, temperature=2.0)) > 0.01


def test_a_clients_own_models_survive_its_state_round_trip(kd_config) -> None:
    """What a Flower node keeps in context.state between rounds (each message may run in a new process)."""
    from safetensors.torch import load as st_load

    from fedcustom.protocols.distill.protocol import DistillClient

    job = build_job(kd_config(federation__rounds=1))
    client: DistillClient = job.server.runtime._handler
    execute(job)
    tensors, meta = client.state_dict()
    fresh = DistillClient(client.model, client.tokenizer, client.codec, client.client_tables, client.settings)
    fresh.load_state_dict(st_load(st_save(tensors)), json.loads(json.dumps(meta)))
    assert sorted(fresh.local_states) == [0, 1]
    for node, state in client.local_states.items():
        assert state.keys() == fresh.local_states[node].keys()
        assert all(torch.equal(state[k], fresh.local_states[node][k]) for k in state)
    assert any(not torch.equal(client.local_states[0][k], client.local_states[1][k]) for k in client.local_states[0])
