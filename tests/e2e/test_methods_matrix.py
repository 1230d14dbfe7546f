"""Every registered method through the same checks: 2 clients x 2-3 rounds on tiny BERT and LLaMA.

The first tests run every method, whatever its protocol (parameter sharing, split learning,
distillation); the later ones check what only parameter-sharing methods promise (what is sent is
exactly the trainable tensors).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save as st_save
from transformers import AutoModelForSequenceClassification

from fedcustom.codecs import RawCodec
from fedcustom.methods import get_method, method_names, trainable_state
from fedcustom.runner import build_job, execute
from fedcustom.runtime import Message
from fedcustom.wire import schedule_to_config

from conftest import TINY_LR

ALL_METHODS = method_names()
PARAMETER_SHARING = method_names("parameter_sharing")

BACKBONES = ["tiny_bert", "tiny_llama"]
# KD-FedLLM needs public rows outside the clients' 150 (the toy corpus has 192 training rows).
EXTRA = {"distill": {"method__public_size": 40, "data__max_train_examples": 150}, "split": {"method__cut_layer": 1}}


def method_config(tiny_config, method: str, **overrides):
    """The tiny config for ``method`` with its learning rate and any settings its protocol needs."""
    return tiny_config(method__name=method, train__lr=TINY_LR[method], **EXTRA.get(method, {}), **overrides)


EVERY_METHOD_ON_EVERY_BACKBONE = [(m, b) for m in ALL_METHODS for b in BACKBONES]


@pytest.mark.parametrize(("method", "backbone_fixture"), EVERY_METHOD_ON_EVERY_BACKBONE)
def test_every_method_runs_logs_and_learns(method: str, backbone_fixture: str, request, tiny_config) -> None:
    # Prepare
    backbone = request.getfixturevalue(backbone_fixture)
    job = build_job(method_config(tiny_config, method, model__name=backbone, federation__rounds=3))
    frozen_before = {n: p.detach().clone() for n, p in job.model.named_parameters() if not p.requires_grad}
    # Execute
    summary = execute(job)
    # Assert: every round logged, local loss falls, bytes and FLOPs recorded for every sampled client
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in log] == [0, 1, 2, 3]
    assert log[3]["train_loss"] < log[1]["train_loss"]
    for record in log[1:]:
        clients = {str(c) for c in record["clients"]}
        assert set(record["bytes_up"]) == set(record["bytes_down"]) == set(record["client_flops"]) == clients
        assert all(b > 0 for b in record["bytes_up"].values())
        assert all(f > 0 for f in record["client_flops"].values())
        assert record["rejected"] == {}
    assert summary["method"] == method and 0 <= summary["final_accuracy"] <= 1
    assert summary["bytes_up_total"] == sum(sum(r["bytes_up"].values()) for r in log[1:])
    # Assert: the frozen backbone did not move by a single bit
    for name, before in frozen_before.items():
        assert torch.equal(before, dict(job.model.named_parameters())[name]), name
    if get_method(method).protocol == "parameter_sharing":
        assert_sends_exactly_the_trainable_tensors(job, log, summary, method)


def assert_sends_exactly_the_trainable_tensors(job, log: list[dict], summary: dict, method: str) -> None:
    """Parameter sharing: the global model improves, and each upload and broadcast is exactly the
    trainable tensors (safetensors framing is the only overhead)."""
    assert log[3]["eval_loss"] < log[0]["eval_loss"]
    expected_bytes = len(st_save(job.server.global_state))
    assert set(job.server.global_state) == {n for n, p in job.model.named_parameters() if p.requires_grad}
    for record in log[1:]:
        assert set(record["bytes_up"].values()) == {expected_bytes}
        assert set(record["bytes_down"].values()) == {expected_bytes}
    fp32 = sum(t.numel() * 4 for t in job.server.global_state.values())
    assert fp32 < expected_bytes < fp32 * 1.01 + 4096
    assert summary["trainable_params"] == sum(t.numel() for t in job.server.global_state.values())
    if method != "full":
        assert 0 < summary["trainable_params"] < summary["total_params"] / 2


@pytest.mark.parametrize("method", PARAMETER_SHARING)
def test_client_reply_payload_names_match_trainable_tensors(method: str, tiny_config) -> None:
    # Prepare
    job = build_job(tiny_config(method__name=method))
    codec = RawCodec()
    message = Message("train", 1, codec.encode(job.initial), schedule_to_config(job.schedule, 0))
    # Execute
    reply = job.server.runtime.send_and_receive({0: message})[0]
    # Assert
    assert reply.error is None
    sent = codec.decode(reply.payload)
    assert sent.keys() == {n for n, p in job.model.named_parameters() if p.requires_grad}
    assert all(sent[n].shape == job.initial[n].shape for n in sent)
    if method in ("lora", "prefix", "prompt"):
        assert all(("lora_" in n) or ("prompt_encoder" in n) or ("modules_to_save" in n) for n in sent)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_same_seed_gives_identical_results(method: str, tiny_config, tmp_path) -> None:
    # Prepare / Execute
    states, logs = [], []
    for i in range(2):
        cfg = method_config(tiny_config, method, output__dir=str(tmp_path / f"run{i}"), federation__local_epochs=1)
        job = build_job(cfg)
        execute(job)
        states.append(job.server.global_state)
        lines = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
        logs.append([{k: v for k, v in r.items() if k not in ("wall_seconds", "memory")} for r in lines])
    # Assert
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert logs[0] == logs[1]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_saved_result_loads_with_hugging_face(method: str, tiny_config, tiny_bert) -> None:
    # Prepare
    job = build_job(method_config(tiny_config, method, federation__rounds=1))
    execute(job)
    batch = job.tokenizer(["the movie was great", "the plot was awful"], return_tensors="pt", padding=True)
    job.model.eval()
    with torch.no_grad():
        expected = job.model(**batch).logits
    # Execute
    if not isinstance(job.model, PeftModel):  # full fine-tuning and split learning train every weight
        assert job.model_dir.name == "model"
        loaded = AutoModelForSequenceClassification.from_pretrained(job.model_dir)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        loaded = PeftModel.from_pretrained(base, job.model_dir)
    loaded.eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    # Assert
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert trainable_state(job.model).keys() == job.server.global_state.keys()
