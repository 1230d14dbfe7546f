"""Codec chains: exact lossless round trips, bounded quantization error, error feedback that loses
nothing, deltas that survive skipped rounds, and malformed payloads rejected without stopping a round."""

from __future__ import annotations

import json

import pytest
import torch

from fedcustom.codecs import CodecChain, Link, parse_chain
from fedcustom.codecs.quantize import max_error
from fedcustom.errors import ConfigError, PayloadError
from fedcustom.runner import build_job, execute
from fedcustom.runtime import Reply

from conftest import TINY_LR


def _states(rounds: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A drifting model: each round's state is the last one plus a small step (like training)."""
    gen = torch.Generator().manual_seed(seed)
    state = {"w": torch.randn(70, 33, generator=gen), "b": torch.randn(5, generator=gen), "s": torch.randn(1, generator=gen)}
    out = []
    for _ in range(rounds):
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        out.append(state)
    return out


@pytest.mark.parametrize("spec", ["raw", "zstd", "delta", "delta,zstd", "gradualdiff"])
def test_lossless_chains_round_trip_bit_for_bit_across_rounds(spec: str) -> None:
    # Prepare
    chain, sender, receiver = CodecChain(spec), Link(), Link()
    # Execute / Assert: every round's state arrives exactly, whatever was sent before
    for state in _states(4):
        got = chain.decode(chain.encode(state, sender), receiver)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("coding", ["fp16", "bf16", "int8", "int4"])
def test_quantization_error_is_within_its_stated_bound(coding: str) -> None:
    # Prepare: values over several orders of magnitude, a zero block and an odd length
    gen = torch.Generator().manual_seed(1)
    flat = torch.cat([torch.randn(1000, generator=gen) * 10 ** torch.randint(-3, 3, (1000,), generator=gen),
                      torch.zeros(64), torch.randn(7, generator=gen)])
    chain = CodecChain(coding)
    # Execute
    got = chain.decode(chain.encode({"x": flat}))["x"]
    # Assert
    error = (got - flat).abs()
    assert (error <= max_error(flat, coding)).all()
    assert error.max() > 0  # it is lossy, and the bound is not vacuous
    assert torch.equal(got[1000:1064], torch.zeros(64))


def test_int4_and_int8_sizes_are_what_they_claim() -> None:
    state = {"x": torch.randn(64 * 100)}
    sizes = {c: len(CodecChain(c).encode(state)) for c in ("raw", "int8", "int4")}
    assert sizes["int8"] < sizes["raw"] / 3.5 and sizes["int4"] < sizes["raw"] / 6.5


def test_error_feedback_delivers_the_true_cumulative_update() -> None:
    # Prepare: the sender's updates against a fixed reference, sparsified to 5% and quantized
    chain, sender = CodecChain("delta,topk:0.05,int8"), Link()
    reference = {k: torch.zeros_like(v) for k, v in _states(1)[0].items()}
    delivered_sum = {k: torch.zeros_like(v) for k, v in reference.items()}
    true_sum = {k: torch.zeros_like(v) for k, v in reference.items()}
    # Execute
    for update in _states(5, seed=3):
        sender.reference = reference  # the up direction: each round's difference starts at the same place
        delivered = chain.decode(chain.encode({k: reference[k] + v for k, v in update.items()}, sender),
                                 Link(reference=reference))
        for k in update:
            delivered_sum[k] += delivered[k] - reference[k]
            true_sum[k] += update[k]
    # Assert: what arrived plus what the sender still holds is everything that was meant to be sent
    for k in true_sum:
        torch.testing.assert_close(delivered_sum[k] + sender.residual[k], true_sum[k], rtol=0, atol=1e-5)
    assert any(sender.residual[k].abs().max() > 1e-3 for k in sender.residual)  # it really held something back


def test_a_receiver_that_missed_rounds_still_reconstructs_the_exact_state() -> None:
    # Prepare: the server keeps one link per client; client 1 only syncs in rounds 1 and 4
    chain = CodecChain("delta,zstd")
    server_links, client_links = {0: Link(), 1: Link()}, {0: Link(), 1: Link()}
    states = _states(4)
    # Execute / Assert
    for rnd, state in enumerate(states, 1):
        for node in ([0, 1] if rnd in (1, 4) else [0]):
            got = chain.decode(chain.encode(state, server_links[node]), client_links[node])
            assert all(torch.equal(got[k], state[k]) for k in state), (rnd, node)


@pytest.mark.parametrize(("spec", "message"), [
    ("delta,int8,topk:0.1", "out of order"), ("topk:0.1,int8", "topk needs delta"), ("delta,lz4", "unknown stage"),
    ("int8,int4", "value coding given twice"), ("delta,topk:2", "fraction must be in"), ("delta,topk:x", "needs a fraction"),
])
def test_bad_chains_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_chain(spec)


@pytest.mark.parametrize("spec", ["raw", "int8", "delta,topk:0.1,int4,zstd", "gradualdiff"])
def test_corrupted_truncated_or_reshaped_payloads_raise_payload_errors(spec: str) -> None:
    # Prepare
    state = _states(1)[0]
    chain = CodecChain(spec)
    good = chain.encode(state, Link())
    other_shape = chain.encode({**state, "b": torch.randn(6)}, Link())
    # Execute / Assert
    for bad in (good[: len(good) // 2], b"\x00" * 40, bytes(reversed(good))):
        with pytest.raises(PayloadError):
            chain.decode(bad, Link())
    if chain.spec.delta:  # a difference of the wrong shape against the receiver's reference
        receiver = Link()
        chain.decode(chain.encode(state, Link()), receiver)
        with pytest.raises(PayloadError, match="shape"):
            chain.decode(other_shape, receiver)


def test_a_corrupt_upload_is_rejected_and_the_round_goes_on_with_the_rest(tiny_config) -> None:
    # Prepare: three clients send delta,int8,zstd uploads; client 1's is truncated
    job = build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=3,
                                codec__up="delta,topk:0.2,int8,zstd", codec__down="gradualdiff"))
    honest = job.server.runtime._handler

    def handler(node, message):
        reply = honest(node, message)
        return Reply(reply.payload[:-9], reply.num_examples, reply.metrics) if node == 1 else reply

    job.server.runtime._handler = handler
    start = job.server.global_state
    # Execute
    result = job.server.run_round(1)
    second = job.server.run_round(2)
    # Assert
    assert set(result.rejected) == {1} and "zstd" in result.rejected[1]
    assert any(not torch.equal(start[k], v) for k, v in job.server.global_state.items())
    assert set(second.rejected) == {1}  # still corrupt, but the reset link itself caused no error
    assert second.bytes_down[1] > second.bytes_down[0]  # client 1's link was reset: a full state, not a difference


def test_codec_chain_run_counts_real_bytes_and_matches_raw_when_lossless(tiny_config, tmp_path) -> None:
    # Prepare / Execute: the same seeded run with raw payloads and with GradualDiff-Fed (lossless)
    runs = {}
    for codec in ("raw", "gradualdiff"):
        job = build_job(tiny_config(method__name="full", train__lr=TINY_LR["full"], federation__clients=3,
                                    federation__clients_per_round=2, federation__rounds=3, codec__up=codec,
                                    output__dir=str(tmp_path / codec)))
        execute(job)
        runs[codec] = (job, [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()])
    # Assert: bit-identical global models, and GradualDiff's differences are smaller on the wire
    (raw_job, raw_log), (gd_job, gd_log) = runs["raw"], runs["gradualdiff"]
    assert all(torch.equal(raw_job.server.global_state[k], v) for k, v in gd_job.server.global_state.items())
    assert sum(sum(r["bytes_up"].values()) for r in gd_log[1:]) < sum(sum(r["bytes_up"].values()) for r in raw_log[1:])
    assert gd_log[2]["rejected"] == {} and gd_log[3]["rejected"] == {}


def test_a_persistent_sparse_link_converges_to_the_state_without_overshooting() -> None:
    # Prepare: server-to-client style: the reference follows the receiver, so no residual is added
    chain, sender, receiver = CodecChain("delta,topk:0.1,int8"), Link(error_feedback=False), Link()
    target = _states(1)[0]
    errors = []
    # Execute: the same state sent again and again, 10% of the values at a time
    for _ in range(15):
        got = chain.decode(chain.encode(target, sender), receiver)
        errors.append(max(float((got[k] - target[k]).abs().max()) for k in target))
    # Assert: the gap only shrinks, to quantization noise (a residual added on top would overshoot)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.05 * errors[0]
    assert not sender.residual


def test_the_first_message_on_a_sparse_link_is_the_whole_state() -> None:
    # A difference against nothing is the state itself: top-k of it would zero 95% of the weights
    state = _states(1)[0]
    chain = CodecChain("delta,topk:0.05,int8")
    got = chain.decode(chain.encode(state, Link()), Link())
    assert all(((got[k] - state[k]).abs() <= max_error(state[k].flatten(), "int8").view_as(state[k])).all() for k in state)


def test_with_a_lossy_broadcast_the_server_applies_updates_to_the_exact_global(tiny_config) -> None:
    # Prepare: clients that train nothing (they echo what they reconstructed) behind a sparse, quantized broadcast
    job = build_job(tiny_config(method__name="lora", codec__up="delta,int8", codec__down="delta,topk:0.1,int8"))
    client = job.server.runtime._handler

    def echo(node, message):
        received = client._receive(node, message)
        return Reply(job.server.codec.encode(received, Link(reference=received)), 10, {"train_loss": 0.0})

    job.server.runtime._handler = echo
    before = job.server.global_state
    # Execute
    job.server.run_round(1)
    job.server.run_round(2)
    # Assert: zero updates leave the global exactly where it was (averaging the clients' approximations would not)
    assert all(torch.equal(before[k], v) for k, v in job.server.global_state.items())


def test_a_small_payload_cannot_make_the_receiver_allocate_past_its_limit() -> None:
    # Prepare: 4M zeros (16 MB as fp32) through int4,zstd: a few kB on the wire, a 2 MB blob after zstd
    chain, receiver = CodecChain("int4,zstd"), CodecChain("int4,zstd")
    payload = chain.encode({"w": torch.zeros(4 * 2**20)}, Link())
    receiver.limit_decoded(8 * 2**20)  # the blob fits; the tensors it describes (16 MB) do not
    # Execute / Assert: refused from the shape table, before dequantizing (once it decoded whatever it claimed)
    assert len(payload) < 50_000
    with pytest.raises(PayloadError, match="shape table asks for 16777216 bytes"):
        receiver.decode(payload, Link())


def test_top_k_sends_nothing_of_an_empty_tensor() -> None:
    chain, sender, receiver = CodecChain("delta,topk:0.1,int8"), Link(), Link()
    for step in range(3):  # the first message is dense; the later ones are sparse (k of 0 values once raised)
        state = {"w": torch.full((6,), float(step)), "empty": torch.zeros(0, 4)}
        out = chain.decode(chain.encode(state, sender), receiver)
        assert out["empty"].shape == (0, 4)


def test_bytes_after_the_zstd_frame_are_a_payload_error() -> None:
    chain = CodecChain("delta,zstd")
    payload = chain.encode({"w": torch.randn(8)}, Link())
    with pytest.raises(PayloadError, match="not a valid zstd frame"):
        chain.decode(payload + b"trailing bytes", Link())


def test_raw_size_is_the_raw_payload_length_without_encoding_it() -> None:
    # Prepare: states with every dtype a model holds, scalars, empty tensors, offsets of growing digit counts,
    # names safetensors orders differently from insertion (and a non-ASCII, quoted one)
    import random

    from fedcustom.codecs import RawCodec, raw_size

    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]
    rng = random.Random(0)
    states: list[dict[str, torch.Tensor]] = [{}, {"é\"w\\": torch.zeros(3, dtype=torch.int8)}]
    for _ in range(100):
        states.append({f"layer.{rng.randint(0, 12)}.w{j}":
                       torch.zeros([rng.randint(0, 40) for _ in range(rng.randint(0, 3))], dtype=rng.choice(dtypes))
                       for j in range(rng.randint(1, 30))})
    states.append({"complex": torch.zeros(2, dtype=torch.complex64), "w": torch.zeros(3)})  # not in the table
    # Execute / Assert: byte for byte the library's length
    for state in states:
        assert raw_size(state) == len(RawCodec().encode(state))
