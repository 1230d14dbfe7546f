"""Personalization (issue 21, item 2): private tensors stay with their client, every client keeps and is scored with
its own model, and finetune:K scores the global model after K local steps without touching training."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedcustom.assemble import check_runtime_support
from fedcustom.config import ConfigError
from fedcustom.methods import trainable_state
from fedcustom.personalize import PERSONAL_ADAPTER, parse_personalize
from fedcustom.runner import build_job, execute

from conftest import TINY_LR


def _log(job) -> list[dict]:
    return [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]


def _spy_uploads(job) -> list[dict[str, torch.Tensor]]:
    """Record every update the clients send, as the server decodes it."""
    client, uploads = job.server.runtime.local_handler, []
    train = client.train

    def spy(node, message):
        reply = train(node, message)
        uploads.append(job.server.codec.decode(reply.payload))
        return reply

    client.train = spy
    return uploads


def _load_client_adapter(folder, tiny_bert: str, labels: int, dual: bool) -> dict[str, torch.Tensor]:
    """A saved client model as a user loads it with PEFT (dual-lora: the personal adapter beside the global one)."""
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=labels)
    model = PeftModel.from_pretrained(base, folder)
    if dual:
        model.load_adapter(str(folder / PERSONAL_ADAPTER), PERSONAL_ADAPTER)
    return {n: p.detach() for n, p in model.named_parameters()}


MODES = [  # mode, method, what is private, whether whole tensors are
    ("head", "lora", "classifier", True),
    ("lora-b-local", "lora", "lora_B", True),
    ("dual-lora", "lora", PERSONAL_ADAPTER, True),
    ("local-prefix:2", "prefix", "prompt_encoder", False),
    ("local-prefix", "prompt", "prompt_encoder", False),
]


@pytest.mark.parametrize("mode, method, private_part, whole", MODES)
def test_private_tensors_never_leave_their_client_and_each_client_keeps_its_own(
        tiny_config, tiny_bert: str, mode: str, method: str, private_part: str, whole: bool) -> None:
    # Prepare: 3 clients, 2 rounds
    cfg = tiny_config(method__name=method, train__lr=TINY_LR[method], federation__clients=3,
                      federation__personalize=mode)
    job = build_job(cfg)
    initial = trainable_state(job.model)
    private_names = {n for n in initial if private_part in n.split(".")}
    uploads = _spy_uploads(job)
    # Execute
    summary = execute(job)
    # Assert: the server holds and every upload carries exactly the shared tensors; none private
    assert private_names and len(uploads) == 6
    client = job.server.runtime.local_handler
    if whole:  # private tensors are never sent
        assert set(job.server.global_state) == set(initial) - private_names
        assert all(set(update) == set(initial) - private_names for update in uploads)
    else:  # local-prefix: the shared virtual tokens are sent, the private ones (the last L) never
        assert set(job.server.global_state) == set(initial)
        for name in private_names:
            rows = initial[name].shape[0]
            kept = 2 if mode.endswith(":2") else rows // 2
            assert job.server.global_state[name].shape[0] == rows - kept
            assert all(update[name].shape[0] == rows - kept for update in uploads)
    # each client trained its own private part (none equal the pretrained one, or another client's)
    assert sorted(client.private) == [0, 1, 2]
    for c, private in client.private.items():
        assert set(private) == private_names
        assert any(not torch.equal(private[n], client.private_initial[n]) for n in private_names)
        for other in range(c):
            assert any(not torch.equal(private[n], client.private[other][n]) for n in private_names)
    # held-out rows (0.2 by default) scored with the global and each client's own model, every round
    log = _log(job)
    assert all(set(r["client_eval_personal"]) == {"0", "1", "2"} for r in log[1:])
    assert set(summary["client_accuracy_personal"]) == {"0", "1", "2"}
    assert "client_accuracy_personal_worst10" in summary and "client_accuracy_mean" in summary
    # each client's model is saved and loads with PEFT, its private part in place
    labels, dual = len(job.data.label_names), mode == "dual-lora"
    for c in range(3):
        loaded = _load_client_adapter(job.out / "clients" / str(c) / "adapter", tiny_bert, labels, dual)
        own = client.model_for(c, job.server.global_state)
        for name in private_names:
            torch.testing.assert_close(loaded[name], own[name], rtol=0, atol=0)
    # the save messages a deployment sends at the end (the global tensors to each of the 3 clients) are counted
    from fedcustom.codecs import RawCodec

    assert summary["bytes_save_total"] == 3 * len(RawCodec().encode(job.server.global_state))
    if dual:  # the global folder holds the global adapter only
        assert not (job.out / "adapter" / PERSONAL_ADAPTER).exists()


def test_private_tensors_survive_a_checkpoint(tiny_config) -> None:
    # Prepare: a finished run with private heads
    cfg = tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=2, federation__rounds=1,
                      federation__personalize="head")
    job = build_job(cfg)
    execute(job)
    tensors, meta = job.server.runtime.local_handler.state_dict()
    # Execute: a fresh job restores the clients' state
    fresh = build_job(cfg)
    fresh.server.runtime.local_handler.load_state_dict(tensors, meta)
    # Assert
    restored = fresh.server.runtime.local_handler.private
    assert sorted(restored) == [0, 1]
    for c, private in job.server.runtime.local_handler.private.items():
        for name, tensor in private.items():
            assert torch.equal(restored[c][name], tensor)


def test_finetune_scores_each_client_after_local_steps_without_changing_training(tiny_config) -> None:
    # Prepare: the same run without personalization (same held-out rows), and with finetune:3
    plain = build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=3,
                                  federation__client_eval_fraction=0.2, output__dir=str(tiny_config().output.dir) + "p"))
    tuned = build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=3,
                                  federation__personalize="finetune:3"))
    # Execute
    execute(plain)
    summary = execute(tuned)
    # Assert: training is untouched (bit for bit), and each client's score is of its fine-tuned model
    for name, tensor in plain.server.global_state.items():
        assert torch.equal(tuned.server.global_state[name], tensor), name
    assert [r["train_loss"] for r in _log(plain)] == [r["train_loss"] for r in _log(tuned)]
    assert [r["client_eval"] for r in _log(plain)] == [r["client_eval"] for r in _log(tuned)]
    final = _log(tuned)[-1]
    assert set(final["client_eval_personal"]) == {"0", "1", "2"}
    assert final["client_eval_personal"] != final["client_eval"]
    assert "client_accuracy_personal" in summary
    assert not (tuned.out / "clients").exists()  # nothing private is kept


@pytest.mark.parametrize("overrides, expected", [
    ({"federation__personalize": "private"}, "'private'; expected none, head, lora-b-local, dual-lora"),
    ({"federation__personalize": "finetune:0"}, "finetune:K"),
    ({"federation__personalize": "head", "method__name": "split", "method__cut_layer": 1}, "--personalize with"),
    ({"federation__personalize": "lora-b-local", "method__name": "prefix"}, "trains none"),
    ({"federation__personalize": "dual-lora", "method__name": "prefix"}, "needs --method lora"),
    ({"federation__personalize": "local-prefix", "method__name": "lora"}, "trains none"),
    ({"federation__personalize": "local-prefix:4"}, "expected 1 .. 3"),
])
def test_bad_personalization_is_one_clear_error(tiny_config, overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        cfg = tiny_config(**overrides)
        check_runtime_support(cfg)
        build_job(cfg)


def test_modes_name_their_private_tensors() -> None:
    head, b_local = parse_personalize("head"), parse_personalize("lora-b-local")
    assert head.is_private("base_model.model.classifier.modules_to_save.default.weight")
    assert not head.is_private("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight")
    assert b_local.is_private("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight")
    assert not b_local.is_private("base_model.model.classifier.modules_to_save.default.weight")
    assert parse_personalize("finetune:5").finetune_steps == 5 and not parse_personalize("finetune:5").keeps_private
    assert b_local.is_private("x.lora_B.default.weight") and parse_personalize("dual-lora").is_private(
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.personal.weight")
    local = parse_personalize("local-prefix:1")
    table = torch.arange(12.0).reshape(4, 3)
    shared, private = local.split({"prompt_encoder.default.embedding.weight": table, "w": torch.ones(2)})
    assert shared["prompt_encoder.default.embedding.weight"].shape == (3, 3) and set(private) == {
        "prompt_encoder.default.embedding.weight"}
    assert torch.equal(local.merge(shared, private)["prompt_encoder.default.embedding.weight"], table)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_local_only_training_shares_nothing_and_each_client_learns_alone(tiny_config, method: str) -> None:
    # Prepare: 3 clients, 2 rounds, nothing shared
    cfg = tiny_config(method__name=method, train__lr=TINY_LR[method], federation__clients=3,
                      federation__personalize="local")
    job = build_job(cfg)
    initial = trainable_state(job.model)
    uploads = _spy_uploads(job)
    # Execute
    summary = execute(job)
    # Assert: no tensor is uploaded or held by the server, the global model stays the initial one
    assert len(uploads) == 6 and all(update == {} for update in uploads)
    assert job.server.global_state == {}
    assert summary["accuracy_per_round"][0] == summary["final_accuracy"]
    # each client's own model moved away from the pretrained one, and differs from the others'
    client = job.server.runtime.local_handler
    assert set(client.private) == {0, 1, 2}
    for node in range(3):
        assert set(client.private[node]) == set(initial)
        assert any(not torch.equal(client.private[node][n], initial[n]) for n in initial)
    assert any(not torch.equal(client.private[0][n], client.private[1][n]) for n in initial)
    rounds = _log(job)
    assert all(len(r["client_eval_personal"]) == 3 for r in rounds[1:])
    assert summary["bytes_up_per_round"] < 1000  # an empty payload: a header only


def test_a_saved_dual_lora_client_answers_as_that_client(tiny_config, tiny_bert: str) -> None:
    # Prepare: dual-lora, 2 clients, 2 rounds
    from fedcustom.personalize import load_personal

    job = build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__personalize="dual-lora"))
    labels = len(job.data.label_names)
    # Execute
    execute(job)
    # Assert: load_personal switches the personal adapter on beside the global one (loading it alone left it off,
    # and the model answered as the global one), reproducing client 1's own model
    folder = job.out / "clients" / "1" / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=labels)
    saved = load_personal(PeftModel.from_pretrained(base, folder), folder).eval()
    job.load_model(1)
    job.model.eval()
    texts = ["a fine film", "dull and long"]
    inputs = job.tokenizer(texts, return_tensors="pt", padding=True)
    own_inputs = AutoTokenizer.from_pretrained(folder)(texts, return_tensors="pt", padding=True)  # saved beside it
    assert torch.equal(own_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        own, reloaded = job.model(**inputs).logits, saved(**own_inputs).logits
        job.load_model()
        global_logits = job.model(**inputs).logits
    torch.testing.assert_close(reloaded, own, rtol=0, atol=1e-5)
    assert not torch.allclose(own, global_logits, atol=1e-4)  # the personal adapter does change the answers
