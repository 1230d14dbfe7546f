"""SplitFed rounds over the embedded runtime: every batch is a message exchange, bytes are the
payloads that travelled, client halves are FedAvg-merged, and a bad client is dropped, not fatal."""

from __future__ import annotations

import copy
import json
import math

import datasets
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import toy_rows
from fedcustom.codecs import get_codec
from fedcustom.data.features import make_loader, tokenize
from fedcustom.methods.split import cut_model
from fedcustom.protocols.split.client import SplitClient
from fedcustom.protocols.split.protocol import (BACKWARD, BASE, BASE_MISSING, BEGIN, ROWS_ONLY, SplitServer,
                                                client_half_state)
from fedcustom.protocols.split.rows import decode_rows
from fedcustom.runtime import EmbeddedRuntime, Message, Reply
from fedcustom.strategies.fedavg import FedAvg, weighted_average
from fedcustom.training import LocalSchedule, evaluate

BATCH = 8


def done(reply: Reply) -> bool:
    """The reply carries the trained client half (it answers the last batch's backward)."""
    return reply.metrics.get("done") == 1.0


class Recorder:
    """Wraps a client handler, keeps every (node, message, reply); optionally corrupts the reply that carries one
    node's trained client half."""

    def __init__(self, handler: SplitClient, corrupt_end_of: int | None = None) -> None:
        self.handler, self.corrupt_end_of, self.log = handler, corrupt_end_of, []

    def __call__(self, node: int, message: Message) -> Reply:
        reply = self.handler(node, message)
        if done(reply) and node == self.corrupt_end_of:
            reply = Reply(payload=reply.payload[:-7], num_examples=reply.num_examples, metrics=reply.metrics)  # truncated
        self.log.append((node, message, reply))
        return reply


def _setup(tiny_bert: str, corrupt_end_of: int | None = None):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = toy_rows(100).rename(columns={"sentence": "text"})
    table = tokenize(datasets.Dataset.from_pandas(rows), tokenizer, 16)
    tables = {0: table.select(range(0, 20)), 1: table.select(range(20, 50))}
    split, codec = cut_model(model, 1), get_codec("raw")
    recorder = Recorder(SplitClient(split, tokenizer, codec, tables), corrupt_end_of)
    server = SplitServer(EmbeddedRuntime(recorder, 2), split, FedAvg(), codec,
                         LocalSchedule(lr=3e-3, batch_size=BATCH), seed=0)
    return server, recorder, model, tokenizer, table.select(range(50, 100)), codec


def test_split_rounds_train_count_bytes_and_merge_client_halves(tiny_bert: str) -> None:
    # Prepare
    server, recorder, model, tokenizer, held_out, codec = _setup(tiny_bert)
    before = evaluate(model, held_out, tokenizer, 16)["loss"]
    initial_half = {k: v.clone() for k, v in server.global_client_half.items()}
    # Execute
    results = [server.run_round(rnd, [0, 1]) for rnd in range(1, 4)]
    before_last = dict(server.global_client_half)
    results.append(server.run_round(4, [0, 1]))
    server.load_global()
    after = evaluate(model, held_out, tokenizer, 16)["loss"]
    # Assert: it learns, and the clients' halves trained too (not only the server's)
    assert after < before
    assert any(not torch.equal(initial_half[k], server.global_client_half[k]) for k in initial_half)
    # Assert: one exchange per batch (its backward, the next batch's forward or the trained half) besides begin,
    # activations of shape (batch, seq, hidden)
    last = results[-1]
    batches = {0: math.ceil(20 / BATCH), 1: math.ceil(30 / BATCH)}
    assert last.batches == batches
    for node, count in batches.items():
        kinds = [m.kind for n, m, _ in recorder.log if n == node and m.round == 4]
        assert kinds == [BEGIN] + [BACKWARD] * count
    forwards = [codec.decode(r.payload) for n, m, r in recorder.log
                if m.kind in (BEGIN, BACKWARD) and m.round == 4 and not done(r)]
    assert len(forwards) == sum(batches.values())
    assert all(w["activations"].shape[-1] == model.config.hidden_size and w["activations"].dim() == 3 for w in forwards)
    # Assert: bytes are exactly what travelled in round 4, per client and direction
    for node in (0, 1):
        exchanged = [(m, r) for n, m, r in recorder.log if n == node and m.round == 4]
        assert last.bytes_up[node] == sum(len(r.payload) for _, r in exchanged)
        assert last.bytes_down[node] == sum(len(m.payload) for m, _ in exchanged)
    # Assert: the global client half is the example-weighted mean of the uploaded halves (each the rows it changed
    # in the global half it received)
    ends = {n: r for n, m, r in recorder.log if done(r) and m.round == 4}
    assert all(r.metrics[ROWS_ONLY] == 1.0 for r in ends.values())
    uploads = [decode_rows(before_last, codec.decode(ends[n].payload)) for n in (0, 1)]
    expected = weighted_average(uploads, [20, 30])
    assert expected.keys() == server.global_client_half.keys()
    assert all(torch.equal(server.global_client_half[k], expected[k]) for k in expected)


def test_a_corrupted_client_half_is_rejected_and_the_round_completes(tiny_bert: str) -> None:
    # Prepare
    server, recorder, _, _, _, codec = _setup(tiny_bert, corrupt_end_of=1)
    initial = dict(server.global_client_half)
    # Execute
    result = server.run_round(1, [0, 1])
    # Assert: client 1 rejected with a reason, the global half is client 0's upload alone
    assert set(result.rejected) == {1} and "safetensors" in result.rejected[1]
    (end0,) = [r for n, m, r in recorder.log if done(r) and n == 0]
    uploaded = decode_rows(initial, codec.decode(end0.payload))
    assert uploaded.keys() == server.global_client_half.keys()
    assert all(torch.equal(server.global_client_half[k], uploaded[k]) for k in uploaded)


def test_client_and_server_flops_add_up_to_the_whole_models_training_flops(tiny_bert: str) -> None:
    # Prepare: one client and one batch holding all its rows, so both counts see the same shapes
    server, recorder, model, tokenizer, _, _ = _setup(tiny_bert)
    server.schedule = LocalSchedule(lr=3e-3, batch_size=32)
    batch = next(iter(make_loader(recorder.handler.client_tables[0], tokenizer, 32, seed=None)))
    model.train()  # as in the split round: attention dropout changes which kernels run
    with FlopCounterMode(display=False) as whole:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    # Execute
    result = server.run_round(1, [0])
    # Assert: the split moves work between the parties but adds none
    assert result.batches == {0: 1}
    assert result.client_flops[0] > 0 and result.server_flops[0] > 0
    assert result.client_flops[0] + result.server_flops[0] == whole.get_total_flops()


class Restarting:
    """A new SplitClient on a new copy of the model for every message, given only the state the previous one
    saved, through safetensors and JSON: what a SuperNode does, where each message runs in a new process."""

    def __init__(self, make_client) -> None:
        self.make_client, self.saved, self.recomputed = make_client, None, 0

    def __call__(self, node: int, message: Message) -> Reply:
        client = self.make_client()
        if self.saved:
            client.load_state_dict(st_load(self.saved[0]), json.loads(self.saved[1]))
        pending = any(s.pending is not None for s in client.sessions.values())
        reply = client(node, message)
        self.recomputed += message.kind == BACKWARD and pending
        tensors, meta = client.state_dict()
        self.saved = st_save({k: v.contiguous() for k, v in tensors.items()}), json.dumps(meta)
        return reply


@pytest.mark.parametrize("head_on_client", [False, True], ids=["head-on-server", "u-shaped"])
def test_a_client_rebuilt_for_every_message_trains_exactly_like_one_kept_in_memory(tiny_bert: str,
                                                                                  head_on_client: bool) -> None:
    # Prepare: one starting model (with dropout on) and the same rows for both runs
    torch.manual_seed(0)
    start = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert start.config.hidden_dropout_prob > 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = toy_rows(60).rename(columns={"sentence": "text"})
    table = tokenize(datasets.Dataset.from_pandas(rows), tokenizer, 16)
    tables, codec, schedule = {0: table.select(range(0, 20)), 1: table.select(range(20, 50))}, get_codec("raw"), \
        LocalSchedule(lr=3e-3, batch_size=BATCH)

    def cut(model):
        return cut_model(model, 1, head_on_client=head_on_client)

    def train(runtime_handler, split) -> SplitServer:
        torch.manual_seed(1)  # the server half's dropout draws from the process RNG
        server = SplitServer(EmbeddedRuntime(runtime_handler, 2), split, FedAvg(), codec, schedule, seed=0)
        for rnd in (1, 2):
            assert server.run_round(rnd, [0, 1]).rejected == {}
        return server

    kept_split = cut(copy.deepcopy(start))
    restarting = Restarting(lambda: SplitClient(cut(copy.deepcopy(start)), tokenizer, codec, tables))
    # Execute: the client shares the server's model in memory / a new client per message
    kept = train(SplitClient(kept_split, tokenizer, codec, tables), kept_split)
    rebuilt = train(restarting, cut(copy.deepcopy(start)))
    # Assert: every backward ran in a new client that had to recompute its forward, with the same result
    assert restarting.recomputed == 2 * (math.ceil(20 / BATCH) + math.ceil(30 / BATCH))
    for kept_half, rebuilt_half in [(kept.global_client_half, rebuilt.global_client_half),
                                    (kept.global_server_half, rebuilt.global_server_half)]:
        assert kept_half.keys() == rebuilt_half.keys()
        for name, value in kept_half.items():
            torch.testing.assert_close(rebuilt_half[name], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(kept.global_client_half[k], v) for k, v in client_half_state(cut(start)).items())


class Forgetful:
    """A client that loses, before each split_begin, the global half it kept (a restarted worker), or, before each
    later message, the one its session received (a session restored from a node's context): the exchanges then fall
    back to whole client halves."""

    def __init__(self, handler: SplitClient, before: str) -> None:
        self.handler, self.before, self.log = handler, before, []

    def __call__(self, node: int, message: Message) -> Reply:
        if message.kind == BEGIN == self.before:
            self.handler.kept.clear()
        if message.kind != BEGIN and self.before != BEGIN:
            self.handler.sessions[node].base = None
        reply = self.handler(node, message)
        self.log.append((node, message, reply))
        return reply


def test_changed_rows_give_the_whole_halves_bit_for_bit_in_fewer_bytes_and_fall_back_when_forgotten(
        tiny_bert: str) -> None:
    # Prepare: three runs from the same start: rows both ways; a node that forgets its version before every
    # begin; a session that forgets what it received before every end
    def train(wrap) -> tuple[SplitServer, list]:
        server, recorder, *_ = _setup(tiny_bert)
        handler = wrap(recorder.handler) if wrap else recorder
        server.runtime = EmbeddedRuntime(handler, 2)
        torch.manual_seed(1)  # the server half's dropout
        results = [server.run_round(rnd, [0, 1]) for rnd in (1, 2, 3)]
        assert all(r.rejected == {} for r in results)
        return server, results, (handler.log if wrap else recorder.log)

    # Execute
    rows, forgets_version, forgets_base = (train(None), train(lambda h: Forgetful(h, BEGIN)),
                                           train(lambda h: Forgetful(h, BACKWARD)))
    # Assert: the same global halves, bit for bit
    for other in (forgets_version, forgets_base):
        for name, value in rows[0].global_client_half.items():
            assert torch.equal(other[0].global_client_half[name], value), name
        for name, value in rows[0].global_server_half.items():
            assert torch.equal(other[0].global_server_half[name], value), name
    # Assert: from round 2 on, begin carries rows built on round 1's version; a forgotten version is asked again
    # whole (one more exchange); a forgotten base makes both ways whole
    begins = [m for _, m, _ in rows[2] if m.kind == BEGIN]
    assert [BASE in m.config for m in begins] == [False, False, True, True, True, True]
    asked_again = [r.metrics.get(BASE_MISSING) for n, m, r in forgets_version[2] if m.kind == BEGIN]
    assert asked_again == [None, None, 1.0, None, 1.0, None, 1.0, None, 1.0, None]
    assert not any(BASE in m.config for _, m, _ in forgets_base[2] if m.kind == BEGIN)
    def weights_bytes(log: list, up: bool) -> list[int]:  # per round, both nodes: the weights' messages alone
        return [sum(len(r.payload) if up else len(m.payload) for _, m, r in log
                    if m.round == rnd and (done(r) if up else m.kind == BEGIN)) for rnd in (1, 2, 3)]

    whole_down, whole_up = weights_bytes(forgets_base[2], False), weights_bytes(forgets_base[2], True)
    down, up = weights_bytes(rows[2], False), weights_bytes(rows[2], True)
    assert down[0] == whole_down[0] and all(d < w for d, w in zip(down[1:], whole_down[1:]))
    assert all(u < w for u, w in zip(up, whole_up))  # (the tiny model's vocabulary is small: 14% less here)
    assert weights_bytes(forgets_version[2], False)[1:] == [d + w for d, w in zip(down[1:], whole_down[1:])]


class Deferred(EmbeddedRuntime):
    """A runtime whose clients live elsewhere and handle a posted message only when its reply is collected (on Flower
    a node works on its own while the server goes on): here every node has a model of its own."""

    def __init__(self, handlers: dict, num_nodes: int) -> None:
        super().__init__(lambda node, message: handlers[node](node, message), num_nodes)
        self.posted: list[tuple[int, str]] = []
        self.handled: list[tuple[int, str]] = []

    @property
    def local_handler(self) -> None:
        return None

    def post(self, messages: dict[int, Message]) -> dict[int, Message]:
        self.posted += [(node, message.kind) for node, message in messages.items()]
        return messages

    def collect(self, posted: dict[int, Message], on_reply=None) -> dict[int, Reply]:
        self.handled += [(node, message.kind) for node, message in posted.items()]
        return self.send_and_receive(posted, on_reply)


def test_remote_clients_begin_early_and_upload_late_and_the_round_is_the_same(tiny_bert: str) -> None:
    # Prepare: one start; the embedded runtime (each message handled at once, one model shared with the server) and
    # a runtime that handles a posted message only when its reply is collected (each node its own model)
    torch.manual_seed(0)
    start = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    table = tokenize(datasets.Dataset.from_pandas(toy_rows(60).rename(columns={"sentence": "text"})), tokenizer, 16)
    tables, codec = {0: table.select(range(0, 20)), 1: table.select(range(20, 50))}, get_codec("raw")

    def train(runtime_for, split) -> SplitServer:
        torch.manual_seed(1)
        server = SplitServer(runtime_for(split), split, FedAvg(), codec, LocalSchedule(lr=3e-3, batch_size=BATCH), 0)
        for rnd in (1, 2):
            assert server.run_round(rnd, [0, 1]).rejected == {}
        return server

    deferred = Deferred({n: SplitClient(cut_model(copy.deepcopy(start), 1), tokenizer, codec, tables) for n in (0, 1)},
                        2)
    # Execute
    at_once = train(lambda split: EmbeddedRuntime(SplitClient(split, tokenizer, codec, tables), 2),
                    cut_model(copy.deepcopy(start), 1))
    overlapped = train(lambda _split: deferred, cut_model(copy.deepcopy(start), 1))
    # Assert: node 1's split_begin went out with node 0's, before node 0's first backward
    assert deferred.posted[:3] == [(0, BEGIN), (1, BEGIN), (0, BACKWARD)]
    # Assert: each node's last backward (whose reply is its trained half) was handled at the round's end, node 0's
    # after node 1's batches
    first_round = deferred.handled[:len(deferred.handled) // 2]
    batches = math.ceil(20 / BATCH), math.ceil(30 / BATCH)
    assert first_round == ([(0, BEGIN)] + [(0, BACKWARD)] * (batches[0] - 1) + [(1, BEGIN)]
                           + [(1, BACKWARD)] * (batches[1] - 1) + [(0, BACKWARD), (1, BACKWARD)])
    # Assert: the same global halves, bit for bit
    for mine, theirs in [(overlapped.global_client_half, at_once.global_client_half),
                         (overlapped.global_server_half, at_once.global_server_half)]:
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
