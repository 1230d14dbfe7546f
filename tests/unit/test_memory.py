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

from conftest import TINY_LR

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


def _distinct_references(links: dict) -> int:
    return len({id(link.reference) for link in links.values() if link.reference is not None})


@pytest.mark.parametrize("chain", ["gradualdiff", "delta,topk:0.2,int8"])
def test_links_that_rebuilt_the_same_global_share_one_copy_of_it_across_a_checkpoint(tiny_config, tmp_path,
                                                                                     chain: str) -> None:
    from fedcustom.assemble import build_job
    from fedcustom.checkpoint import load_checkpoint, save_checkpoint

    # Prepare: 6 clients, 3 sampled a round, a stateful chain both ways (one lossless, one lossy)
    def job(out: str):
        return build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=6,
                                     federation__clients_per_round=3, codec__up=chain, codec__down=chain,
                                     output__dir=str(tmp_path / out)))

    first = job("a")
    # Execute
    for rnd in (1, 2, 3):
        first.server.run_round(rnd)
    # Assert: one reference per round that clients last took part in, not one per client (without sharing: one per client)
    server, clients = first.server, first.server.runtime.local_handler
    sampled = len(server.links_down)  # clients sampled at least once
    assert sampled == len(clients.links_down) >= 4
    rounds_held = len({link.round for link in server.links_down.values()})
    assert rounds_held < sampled
    held = _distinct_references(server.links_down), _distinct_references(clients.links_down)
    if chain == "gradualdiff":  # lossless: every client rebuilt exactly the global it was sent
        assert held == (rounds_held, rounds_held)
    else:  # lossy: a client's reference also depends on which earlier rounds it took part in
        assert rounds_held <= min(held) and max(held) <= sampled
    assert all(link.reference is None for link in clients.links_up.values())  # reset every round: nothing kept
    # Execute: a checkpoint (safetensors refuses tensors that share memory) and a job restored from it
    save_checkpoint(first.out, 3, first.cfg.to_dict(), [], 0.0, first.checkpoint_parts())
    saved = load_checkpoint(first.out)
    second = job("b")
    for name, part in second.checkpoint_parts().items():
        part.load_state_dict(*saved.parts[name])
    # Assert: the restored links share again, and the next round is bit-identical to the uninterrupted run
    restored = second.server
    assert (_distinct_references(restored.links_down),
            _distinct_references(second.server.runtime.local_handler.links_down)) == held
    first.server.run_round(4)
    restored.run_round(4)
    assert all(torch.equal(v, restored.global_state[k]) for k, v in first.server.global_state.items())


def test_shared_references_share_only_identical_tensors() -> None:
    from fedcustom.codecs import Link, SharedReferences

    pool, state = SharedReferences(), {"w": torch.ones(3)}
    links = {0: Link({k: v.clone() for k, v in state.items()}, round=1),
             1: Link({k: v.clone() for k, v in state.items()}, round=1),
             2: Link({"w": torch.tensor([1.0, 1.0, 2.0])}, round=1)}
    for link in links.values():
        pool.share(link, links)
    assert links[0].reference is links[1].reference
    assert links[2].reference is not links[0].reference  # same round, other bits: kept apart
