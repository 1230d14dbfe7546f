"""Memory flat in the number of clients: FedAvg merges each update as it arrives and drops it; robust strategies,
which compare the updates with each other, hold them all (and say so)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fedcustom.codecs import RawCodec
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.runtime import EmbeddedRuntime, Message, Reply
from fedcustom.strategies import ClientUpdate, FedAvg, get_strategy
from fedcustom.strategies.fedavg import RunningMean
from fedcustom.training import LocalSchedule

CLIENTS = 12
STATE = {"w": torch.randn(64, 32), "b": torch.randn(32)}


class TrackingCodec(RawCodec):
    """Raw safetensors that remembers, at each decode, how many earlier decoded states are still alive."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []
        self.alive_at_decode: list[int] = []

    def decode(self, payload: bytes, link: object = None) -> dict[str, torch.Tensor]:
        gc.collect()
        self.alive_at_decode.append(sum(ref() is not None for ref in self.refs))
        state = super().decode(payload, link)
        self.refs.append(weakref.ref(state["w"]))
        return state


def _client(node: int, message: Message) -> Reply:
    codec = RawCodec()
    state = {k: v + node for k, v in codec.decode(message.payload).items()}
    return Reply(payload=codec.encode(state), num_examples=node + 1, metrics={"train_loss": 0.1})


def _round(strategy_spec: str) -> tuple[TrackingCodec, dict[str, torch.Tensor]]:
    up = TrackingCodec()
    server = FederatedServer(EmbeddedRuntime(_client, CLIENTS), get_strategy(strategy_spec), up,
                             {k: v.clone() for k, v in STATE.items()}, lambda s: {"accuracy": 0.0},
                             LocalSchedule(lr=0.1, batch_size=4), clients_per_round=CLIENTS, seed=0, codec_down=RawCodec())
    server.run_round(1)
    return up, server.global_state


def test_fedavg_holds_one_client_state_at_a_time_and_a_robust_strategy_holds_them_all() -> None:
    streaming, _ = _round("fedavg")
    whole, _ = _round("median")
    assert max(streaming.alive_at_decode) == 0  # each earlier state was merged and dropped before the next arrived
    assert whole.alive_at_decode == list(range(CLIENTS))  # the test can fail: median keeps every state alive


def test_streaming_fedavg_equals_fedavg_over_the_whole_round() -> None:
    updates = [ClientUpdate(i, {k: torch.randn_like(v) for k, v in STATE.items()}, n)
               for i, n in enumerate([3, 7, 11, 1, 40])]
    running = RunningMean()
    for update in updates:
        running.add(update.state, update.num_examples)
    streamed, whole = running.result(), FedAvg().aggregate(STATE, updates)
    reference = {k: sum(u.state[k].double() * u.num_examples for u in updates) / 62 for k in STATE}
    for name in STATE:
        assert torch.equal(streamed[name], whole[name])
        assert torch.allclose(streamed[name].double(), reference[name], atol=1e-6)


def test_a_round_merged_as_replies_arrive_gives_the_global_state_of_the_batch_merge() -> None:
    _, streamed = _round("fedavg")
    weights = [node + 1 for node in range(CLIENTS)]
    expected = {k: sum((v + node).double() * w for node, w in enumerate(weights)) / sum(weights) for k, v in STATE.items()}
    for name in STATE:
        assert streamed[name].dtype == torch.float32
        assert torch.allclose(streamed[name].double(), expected[name], atol=1e-6)


@pytest.mark.parametrize("spec", ["median", "trimmed-mean:0.2", "krum:1", "multi-krum:1", "norm-bound:1.0"])
def test_every_robust_strategy_says_it_needs_the_whole_round(spec: str) -> None:
    assert get_strategy(spec).accumulator() is None


def test_the_fast_finiteness_check_still_accepts_large_finite_updates_and_rejects_nan_and_inf() -> None:
    from fedcustom.errors import UpdateRejected
    from fedcustom.validation import validate_update

    reference = {"a": torch.zeros(4)}
    validate_update({"a": torch.full((4,), 3e38)}, reference)  # its sum overflows to inf; every value is finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(UpdateRejected, match="NaN or Inf"):
            validate_update({"a": torch.tensor([1.0, bad, 2.0, 3.0])}, reference)
