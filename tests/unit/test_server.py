"""Server round logic: FedAvg, codec round trips, and rejection of malformed client updates."""

from __future__ import annotations

import pytest
import torch

from fedcustom.codecs import RawCodec
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.runtime import EmbeddedRuntime, Message, Reply
from fedcustom.strategies import ClientUpdate, FedAvg, weighted_average
from fedcustom.training import LocalSchedule
from fedcustom.validation import validate_update

STATE = {"a": torch.randn(3, 4), "b": torch.randn(5)}


def test_fedavg_of_identical_updates_returns_that_update() -> None:
    updates = [ClientUpdate(i, {k: v.clone() for k, v in STATE.items()}, n) for i, n in enumerate([3, 7, 11])]
    merged = FedAvg().aggregate(STATE, updates)
    assert all(torch.equal(merged[k], STATE[k]) for k in STATE)


def test_fedavg_weights_by_examples() -> None:
    merged = weighted_average([{"x": torch.tensor([0.0])}, {"x": torch.tensor([4.0])}], [3, 1])
    assert merged["x"].item() == pytest.approx(1.0)


def test_raw_codec_round_trips_bit_for_bit_and_rejects_garbage() -> None:
    codec = RawCodec()
    payload = codec.encode(STATE)
    decoded = codec.decode(payload)
    assert all(torch.equal(decoded[k], STATE[k]) for k in STATE)
    for bad in (b"", b"not safetensors at all", payload[: len(payload) // 2], b"\xff" * 8 + payload[8:]):
        with pytest.raises(PayloadError, match="not a valid safetensors blob"):
            codec.decode(bad)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"a": torch.zeros(3, 4)}, "tensor names differ"),
        ({"a": torch.zeros(4, 3), "b": torch.zeros(5)}, "shape"),
        ({"a": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5)}, "dtype"),
        ({"a": torch.full((3, 4), float("nan")), "b": torch.zeros(5)}, "NaN or Inf"),
    ],
)
def test_validation_names_the_problem(update: dict, reason: str) -> None:
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(update, STATE)


def _server(handler) -> FederatedServer:
    runtime = EmbeddedRuntime(handler, num_nodes=4)
    return FederatedServer(runtime, FedAvg(), RawCodec(), STATE, lambda s: {"accuracy": 0.0},
                           LocalSchedule(lr=0.1, batch_size=4), clients_per_round=4, seed=0)


def test_malformed_updates_are_rejected_and_the_round_goes_on() -> None:
    # Prepare: client 0 and 1 send good updates (all ones / all threes), 2 garbage, 3 raises
    codec = RawCodec()

    def handler(node: int, message: Message) -> Reply:
        if node == 2:
            return Reply(payload=b"\x00garbage", num_examples=5, metrics={"train_loss": 0.1})
        if node == 3:
            raise RuntimeError("disk full")
        value = 1.0 if node == 0 else 3.0
        state = {k: torch.full_like(v, value) for k, v in codec.decode(message.payload).items()}
        return Reply(payload=codec.encode(state), num_examples=10, metrics={"train_loss": 0.5})

    server = _server(handler)
    # Execute
    result = server.run_round(1)
    # Assert
    assert sorted(result.rejected) == [2, 3]
    assert "safetensors" in result.rejected[2] and "disk full" in result.rejected[3]
    assert all(torch.equal(server.global_state[k], torch.full_like(STATE[k], 2.0)) for k in STATE)
    assert result.train_loss == pytest.approx(0.5)


def test_a_reply_without_a_train_loss_is_merged_and_left_out_of_the_mean_loss() -> None:
    # Prepare: node 1 (another client version, say) reports no metrics at all; the others report their loss
    codec = RawCodec()

    def handler(node: int, message: Message) -> Reply:
        state = {k: torch.full_like(v, float(node)) for k, v in codec.decode(message.payload).items()}
        return Reply(payload=codec.encode(state), num_examples=10, metrics={} if node == 1 else {"train_loss": node})

    server = _server(handler)
    # Execute
    result = server.run_round(1)
    # Assert: the round completed with all four updates; the loss is the mean of the three that reported one
    assert not result.rejected
    assert all(torch.equal(server.global_state[k], torch.full_like(STATE[k], 1.5)) for k in STATE)
    assert result.train_loss == pytest.approx((0 + 2 + 3) / 3)


def test_round_with_only_bad_updates_keeps_the_global_state() -> None:
    server = _server(lambda node, message: Reply(payload=b"junk", num_examples=1))
    result = server.run_round(1)
    assert len(result.rejected) == 4
    assert all(torch.equal(server.global_state[k], STATE[k]) for k in STATE)


def test_embedded_post_handles_at_once_in_node_order_and_collect_reports_each_reply() -> None:
    handled, taken = [], []

    def handler(node: int, message: Message) -> Reply:
        handled.append(node)
        return Reply(payload=bytes([node]))

    runtime = EmbeddedRuntime(handler, num_nodes=3)
    posted = runtime.post({2: Message("train", 1), 0: Message("train", 1)})
    assert handled == [0, 2]  # handled when posted, in node order
    replies = runtime.collect(posted, on_reply=taken.append)
    assert {node: reply.payload for node, reply in replies.items()} == {0: b"\x00", 2: b"\x02"}
    assert taken == [0, 2] and handled == [0, 2]  # collecting handles nothing again
