"""The Flower runtime's translation of our messages, and parity of Flower's simulation engine with the
embedded runtime (same seed, same global state)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from fedcustom.launch import run  # noqa: E402
from fedcustom.methods import trainable_state  # noqa: E402
from fedcustom.runtime import Message, Reply  # noqa: E402
from fedcustom.runtime.flower.records import (  # noqa: E402
    content_to_message, content_to_reply, message_to_content, message_type, reply_to_content,
)


def test_messages_and_replies_survive_the_flower_records_bytes_for_bytes() -> None:
    # Prepare
    payload = bytes(range(256)) * 1000
    message = Message("train", 3, payload, {"lr": 0.01, "epochs": 2, "count_flops": True, "codec_base": 0},
                      attachment=payload[:999])
    reply = Reply(payload=payload[::-1], num_examples=17, metrics={"train_loss": 0.25, "flops": 1e12},
                  attachment=payload[5:77])
    # Execute
    message_back = content_to_message(message_to_content(message, {"extra": "x"}))
    reply_back = content_to_reply(reply_to_content(reply))
    failed_back = content_to_reply(reply_to_content(Reply(error="out of memory")))
    # Assert
    assert message_back == Message("train", 3, payload, {**message.config, "extra": "x"}, payload[:999])
    assert reply_back == reply
    assert failed_back.error == "out of memory" and failed_back.payload == b""
    assert message_type("train") == "train" and message_type("split_backward") == "train.split_backward"


def test_content_from_something_else_is_a_clear_error() -> None:
    foreign = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    with pytest.raises(ValueError, match="no 'fedcustom.config' record .*records: config"):
        content_to_message(foreign)
    assert "no 'fedcustom.reply' record" in content_to_reply(foreign).error


@pytest.mark.integration
def test_flower_simulation_gives_the_embedded_runtimes_global_state(tiny_config, tmp_path) -> None:
    # Prepare: the same job twice, only the runtime differs (SCAFFOLD: each node keeps its control variate in its
    # context.state, and the control variates travel as attachment records). Plain FedAvg's parity is checked by
    # the personalization runs below, which also save and compare the global adapter
    settings = {"method__name": "lora", "train__lr": 3e-3, "federation__local_epochs": 1, "federation__scaffold": True,
                "federation__server_opt": "adam", "federation__server_lr": 3e-3, "federation__prox_mu": 0.1,
                "federation__rounds": 3}
    # Execute
    summaries, logs = _on_both_runtimes(tiny_config, tmp_path, settings)
    # Assert: the same losses each round and the same final adapter (within 1e-6)
    _assert_same_global_state(tmp_path, summaries, logs, clients=[0, 1])


def _assert_same_global_state(tmp_path, summaries: list[dict], logs: list[list[dict]], clients: list[int]) -> None:
    """Both runtimes' rounds ended with the same losses, every one of ``clients`` accepted in the last round on
    Flower, and the same saved adapter."""
    assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], abs=1e-6)
    assert [r["eval_loss"] for r in logs[0]] == pytest.approx([r["eval_loss"] for r in logs[1]], abs=1e-6)
    assert logs[1][-1]["clients"] == clients and logs[1][-1]["rejected"] == {}
    adapters = [load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("embedded", "flower-sim")]
    assert adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=0, atol=1e-6)
    assert summaries[0]["final_accuracy"] == summaries[1]["final_accuracy"]


@pytest.mark.integration
@pytest.mark.parametrize("personalize", ["head", "finetune:2"])
def test_flower_nodes_score_themselves_on_their_own_rows_like_the_embedded_runtime(tiny_config, tmp_path,
                                                                                  personalize) -> None:
    # Prepare: per-client evaluation with a personalization that keeps a private head on each node (across
    # rounds, in the node's state; each node saves its own model at the end) or fine-tunes 2 local steps before
    # scoring; plain FedAvg; only the runtime differs
    settings = {"method__name": "lora", "train__lr": 3e-3, "federation__local_epochs": 1, "federation__clients": 3,
                "federation__personalize": personalize, "federation__client_eval_fraction": 0.25}
    # Execute
    summaries, logs = _on_both_runtimes(tiny_config, tmp_path, settings)
    # Assert: the global model's rounds and saved adapter as in one process
    _assert_same_global_state(tmp_path, summaries, logs, clients=[0, 1, 2])
    # Assert: every node scored the global model and its own on its held-out rows each round, as in one process
    for key in ("client_eval", "client_eval_personal"):
        per_round = [[r[key] for r in log] for log in logs]
        assert all(set(scores) == {"0", "1", "2"} for scores in per_round[1])
        for ours, theirs in zip(*per_round, strict=True):
            assert ours == pytest.approx(theirs, abs=1e-6)
    assert [r["client_eval_personal"] for r in logs[1]] != [r["client_eval"] for r in logs[1]]
    for key in ("client_accuracy_mean", "client_accuracy_personal_mean", "client_accuracy_personal_worst10"):
        assert summaries[1][key] == pytest.approx(summaries[0][key], abs=1e-6)
    # the evaluate and save messages' bytes, counted alike (embedded: what a deployment sends)
    assert [r["bytes_eval"] for r in logs[1]] == [r["bytes_eval"] for r in logs[0]]
    assert summaries[1]["bytes_save_total"] == summaries[0]["bytes_save_total"] > (0 if personalize == "head" else -1)
    # Assert (head): every node wrote its own adapter (its private head in place), as the embedded run writes them
    for client in range(3 if personalize == "head" else 0):
        own = [load_file(str(tmp_path / d / "clients" / str(client) / "adapter" / "adapter_model.safetensors"))
               for d in ("embedded", "flower-sim")]
        assert own[0].keys() == own[1].keys() and any("classifier" in name for name in own[1])
        for name, tensor in own[0].items():
            torch.testing.assert_close(own[1][name], tensor, rtol=0, atol=1e-6)


def test_a_deployment_with_private_tensors_on_its_nodes_is_not_resumed(tiny_config) -> None:
    from fedcustom.deploy.flower.submit import resume_blockers

    assert resume_blockers(tiny_config(method__name="lora", federation__personalize="head")) == [
        "--personalize head (each node's private tensors)"]
    assert resume_blockers(tiny_config(method__name="lora", federation__personalize="finetune:2")) == []


def _on_both_runtimes(tiny_config, tmp_path, settings: dict) -> tuple[list[dict], list[list[dict]]]:
    """The same job embedded and on Flower's simulation engine: both summaries and both round logs."""
    embedded = tiny_config(**settings, output__dir=str(tmp_path / "embedded"))
    simulated = tiny_config(**settings, output__dir=str(tmp_path / "flower-sim"), federation__runtime="flower-sim")
    summaries = [run(embedded), run(simulated)]
    logs = [[json.loads(line) for line in (tmp_path / d / "round_log.jsonl").read_text().splitlines()]
            for d in ("embedded", "flower-sim")]
    return summaries, logs


@pytest.mark.integration
@pytest.mark.parametrize("overrides", [
    {"method__name": "split", "method__cut_layer": 1, "method__split_head": "client", "federation__local_steps": 2},
    {"method__name": "distill", "method__public_size": 20, "data__max_train_examples": 100},
    {"method__name": "lora", "method__lora_ranks": "1,2", "method__lora_aggregation": "stack"},
    {"method__name": "lora", "method__lora_ranks": "1,2", "method__lora_aggregation": "svd"},
    {"method__name": "prefix", "method__num_virtual_tokens": 4, "method__prefix_lengths": "2,4"},
], ids=["split-u-shaped", "distill", "ranks-stack", "ranks-svd", "prefix-lengths"])
def test_flower_simulation_runs_the_many_message_protocols_like_the_embedded_runtime(tiny_config, tmp_path,
                                                                                     overrides) -> None:
    # Prepare: split exchanges five kinds of message per batch; distillation ships the public texts to the nodes;
    # per-client LoRA ranks (merged by FLoRA's stack into the backbone the broadcast carries, or by FlexLoRA's svd)
    # and per-client prefix lengths live on the nodes
    settings = {"train__lr": 3e-3, "federation__local_epochs": 1, "output__save_model": False, **overrides}
    # Execute
    summaries, logs = _on_both_runtimes(tiny_config, tmp_path, settings)
    # Assert: the same rounds, bytes and losses through Flower's messages as in one process
    assert [r["round"] for r in logs[1]] == [0, 1, 2]
    assert all(r["rejected"] == {} and r["clients"] == [0, 1] for r in logs[1][1:])
    assert [r["bytes_up"] for r in logs[0]] == [r["bytes_up"] for r in logs[1]]
    assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], abs=1e-6)
    assert [r["eval_loss"] for r in logs[0]] == pytest.approx([r["eval_loss"] for r in logs[1]], abs=1e-6)
    assert logs[1][-1]["eval_loss"] != logs[1][0]["eval_loss"]
    assert summaries[0]["final_accuracy"] == summaries[1]["final_accuracy"]
    # the client setup went once to each node, with the hello (distillation: its public texts, 20 rows of them)
    assert summaries[1]["bytes_setup_total"] == summaries[0]["bytes_setup_total"] > 0
    assert (summaries[0]["bytes_setup_total"] > 1000) == (overrides["method__name"] == "distill")


def test_the_client_app_routes_every_message_kind_our_servers_send() -> None:
    from fedcustom.protocols import message_kinds
    from fedcustom.protocols.distill.protocol import DISTILL
    from fedcustom.protocols.split import protocol as split
    from fedcustom.deploy.flower.apps import make_client_app
    from fedcustom.wire import EVALUATE, SAVE, TRAIN

    sent = {TRAIN, EVALUATE, SAVE, split.BEGIN, split.HEAD, split.BACKWARD, DISTILL}
    assert set(message_kinds()) == sent  # the registry names them without importing the protocols
    registered = set(make_client_app()._registered_funcs)
    assert {message_type(kind) for kind in sent - {TRAIN}} | {"train.default", "query.fedcustom_hello"} <= registered


@pytest.mark.integration
@pytest.mark.parametrize("method", [{"method__name": "lora"},
                                    {"method__name": "distill", "method__public_size": 24, "method__topk": 4}],
                         ids=["lora", "token-level-distill"])
def test_flower_simulation_instruction_tunes_a_causal_lm_like_the_embedded_runtime(causal_config, tmp_path,
                                                                                  method) -> None:
    # Prepare: distillation ships [prompt, response] pairs to the nodes, which carve the same rows out as the server
    settings = {"federation__rounds": 2, "output__save_model": False, "train__lr": 1e-2, **method}
    embedded = causal_config(**settings, output__dir=str(tmp_path / "embedded"))
    simulated = causal_config(**settings, output__dir=str(tmp_path / "flower-sim"), federation__runtime="flower-sim")
    # Execute
    summaries = [run(embedded), run(simulated)]
    # Assert: the same losses and perplexities each round
    logs = [[json.loads(line) for line in (tmp_path / d / "round_log.jsonl").read_text().splitlines()]
            for d in ("embedded", "flower-sim")]
    assert all(r["rejected"] == {} and r["clients"] == [0, 1] for r in logs[1][1:])
    assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], abs=1e-6)
    assert summaries[0]["perplexity_per_round"] == pytest.approx(summaries[1]["perplexity_per_round"], rel=1e-6)
    assert summaries[1]["final_perplexity"] < summaries[1]["initial_perplexity"]


def test_a_causal_lm_node_reads_and_describes_its_own_instruction_file(causal_config, tmp_path) -> None:
    """A deployed node's own rows: chat-templated and response-masked like the server's, a topic the server has
    never seen is allowed, and the node describes its file by counts only."""
    from conftest import instruction_rows
    from fedcustom.data.features import IGNORE_INDEX
    from fedcustom.runtime import ClientSetup
    from fedcustom.deploy.flower.node import build_node_client, describe_own_data

    own = tmp_path / "own.jsonl"
    rows = instruction_rows(12, seed=3) + [{"instruction": "the cast", "output": "good great", "topic": "music"}]
    own.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = causal_config()
    # Execute
    node = build_node_client(cfg, ClientSetup(["actors", "plot"]), 1, str(own))
    described = describe_own_data(cfg, ["actors", "plot"], str(own), 1)
    # Assert
    table = node.handler.client_tables[1]
    assert len(table) == 13
    first = table[0]
    assert first["labels"][0] == IGNORE_INDEX and first["labels"][-1] != IGNORE_INDEX  # loss on the response only
    assert described == {"examples": 13, "label-histogram": json.dumps([4, 8])}  # "music" is counted in examples only
    schedule = {"lr": 1e-2, "batch_size": 4, "epochs": 1, "weight_decay": 0.0, "count_flops": False, "seed": 0}
    start = node.handler.codec.encode(trainable_state(node.handler.model))
    reply = node.handler(1, Message("train", 1, start, schedule))
    assert reply.error is None and reply.num_examples == 13 and reply.metrics["train_loss"] > 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"adversary__attack": "sign-flip", "adversary__fraction": 0.5}, "--attack: embedded runtime only"),
    ({"federation__client_failure_rate": 0.2}, "--client-failure-rate: embedded runtime only"),
    ({"privacy__secagg": True, "federation__clients_per_round": 1}, "SecAgg\\+, which needs at least 2 clients"),
])
def test_what_only_the_embedded_runtime_can_do_is_a_clear_error_on_flower(tiny_config, tmp_path, overrides,
                                                                        message) -> None:
    from fedcustom.errors import FedCustomError

    cfg = tiny_config(federation__runtime="flower-sim", **overrides)
    with pytest.raises(FedCustomError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()  # refused before the simulation started


@pytest.mark.integration
def test_secagg_on_flower_is_flowers_secaggplus_and_gives_the_fedavg_state(tiny_config, tmp_path, monkeypatch) -> None:
    import numpy as np
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedcustom.runtime.flower import secaggplus

    # Prepare: record every reply the SecAgg+ workflow receives on the server
    received = []
    send_and_receive = secaggplus._CountingGrid.send_and_receive

    def recording(self, messages, timeout=None):
        replies = send_and_receive(self, messages, timeout)
        received.extend(replies)
        return replies

    monkeypatch.setattr(secaggplus._CountingGrid, "send_and_receive", recording)
    settings = {"method__name": "lora", "train__lr": 3e-3, "federation__local_epochs": 1, "federation__clients": 3}
    plain = tiny_config(**settings, output__dir=str(tmp_path / "embedded"))
    secure = tiny_config(**settings, output__dir=str(tmp_path / "flower-sim"), federation__runtime="flower-sim",
                         privacy__secagg=True)
    # Execute
    run(plain)
    run(secure)
    # Assert: every client counted each round, and round 1's aggregate is plain FedAvg's up to SecAgg+'s quantization
    # (about 1e-5 here; later rounds drift further, as Adam turns tiny differences in near-zero gradients into
    # steps of up to the learning rate)
    logs = [[json.loads(line) for line in (tmp_path / d / "round_log.jsonl").read_text().splitlines()]
            for d in ("embedded", "flower-sim")]
    assert all(r["clients"] == [0, 1, 2] and r["rejected"] == {} and min(r["bytes_up"].values()) > 0 for r in logs[1][1:])
    assert logs[1][1]["train_loss"] == pytest.approx(logs[0][1]["train_loss"], abs=1e-9)  # same start, same training
    assert logs[1][1]["eval_loss"] == pytest.approx(logs[0][1]["eval_loss"], abs=1e-5)
    assert logs[1][1]["eval_loss"] != logs[0][1]["eval_loss"]  # quantized: it did go through SecAgg+
    adapters = [load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("embedded", "flower-sim")]
    assert max(float((adapters[1][k] - v).abs().max()) for k, v in adapters[0].items()) < 3 * 3e-3
    # Assert: the server got masked vectors, never a client's tensors (the mod cleared the FitRes arrays)
    masked = [r for r in received if Key.MASKED_PARAMETERS in r.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 2 * 3
    assert all(len(record) == 0 for r in masked for record in r.content.array_records.values())
    ring = np.concatenate([bytes_to_ndarray(b).ravel() for r in masked
                           for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]])
    quarters = np.histogram(ring.astype(np.float64) / 2**32, bins=4, range=(0, 1))[0] / len(ring)
    assert np.allclose(quarters, 0.25, atol=0.03)  # masked values spread over the whole ring, like noise


@pytest.mark.integration
def test_flower_simulation_trains_an_image_model_like_the_embedded_runtime(image_config, tmp_path) -> None:
    # Prepare: LoRA on a tiny ViT over the dark/light image folder, embedded and as a Flower simulation
    embedded = image_config(output__dir=str(tmp_path / "embedded"))
    simulated = image_config(output__dir=str(tmp_path / "flower-sim"), federation__runtime="flower-sim")
    # Execute
    summaries = [run(embedded), run(simulated)]
    # Assert: the same bytes and losses each round
    logs = [[json.loads(line) for line in (tmp_path / d / "round_log.jsonl").read_text().splitlines()]
            for d in ("embedded", "flower-sim")]
    assert all(r["rejected"] == {} and r["clients"] == [0, 1] for r in logs[1][1:])
    assert [r["bytes_up"] for r in logs[0]] == [r["bytes_up"] for r in logs[1]]
    assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], abs=1e-6)
    assert [r["eval_loss"] for r in logs[0]] == pytest.approx([r["eval_loss"] for r in logs[1]], abs=1e-6)
    assert summaries[0]["final_accuracy"] == summaries[1]["final_accuracy"]


def test_simulated_nodes_share_one_handler_and_one_model_as_the_embedded_clients_do(tiny_config) -> None:
    # Prepare: three simulated nodes of one run (a handler per node held a backbone and a tokenized copy of the
    # dataset per client in the simulation's one actor)
    from flwr.app import Context, RecordDict

    from fedcustom.assemble import build_job
    from fedcustom.deploy.flower import node
    from fedcustom.deploy.flower.apps import shares_handler
    from fedcustom.runtime import ClientSetup

    cfg = tiny_config(federation__clients=3)
    data = build_job(cfg).data
    setup = ClientSetup(data.label_names)
    contexts = [Context(run_id=11, node_id=100 + p, node_config={"partition-id": p}, state=RecordDict(),
                        run_config={}) for p in range(3)]
    # Execute
    nodes = [node.simulated_node_client(context, cfg, setup) for context in contexts]
    # Assert: one handler and one model serve every partition, each over its own rows, as in the embedded runtime
    handler = nodes[0].handler
    assert all(n.handler is handler for n in nodes) and [n.partition for n in nodes] == [0, 1, 2]
    assert {p: len(rows) for p, rows in handler.client_tables.items()} == \
        {p: len(data.client_table(p)) for p in range(3)}
    assert shares_handler(cfg) and not shares_handler(tiny_config(method__name="split", method__cut_layer=1))
    # a later run in the same actor builds its own
    later = node.simulated_node_client(Context(run_id=12, node_id=100, node_config={"partition-id": 0},
                                               state=RecordDict(), run_config={}), cfg, setup)
    assert later.handler is not handler and list(node._SIMULATED) == [12]
    node._SIMULATED.clear()
