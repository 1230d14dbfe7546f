"""Secure aggregation (Bonawitz et al. 2017): exact sums under dropouts, masked uploads look uniform,
clear errors for too many dropouts and for malformed or tampered messages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedcustom.privacy import secagg, shamir
from fedcustom.privacy.secagg import (
    SecAggAbort,
    SecAggClient,
    SecAggMessageError,
    SecAggServer,
    decode_sum,
    encode_vector,
    max_clients,
    run_local,
)

LENGTH = 10_000
UIDS = [3, 7, 11, 20, 21, 40]
P_MIN = 0.001


def seeded(seed: int) -> secagg.RandomBytes:
    """A deterministic random-bytes source, so statistical tests give the same p-values every run."""
    return random.Random(seed).randbytes


def float_inputs(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.normal(0.0, 0.4, LENGTH) for u in UIDS}


def masked_uploads(inputs: dict[int, np.ndarray], seed: int, threshold: int = 3) -> dict[int, np.ndarray]:
    """Drive stages 1-3 by hand and return what the server receives from each client."""
    server = SecAggServer(round_=5, threshold=threshold, length=LENGTH)
    clients = {u: SecAggClient(u, 5, seeded(seed + u)) for u in inputs}
    for u, client in clients.items():
        server.receive_advertise(u, client.advertise())
    for u, msg in server.share_requests().items():
        server.receive_shares(u, clients[u].share(msg))
    uploads = {}
    for u, msg in server.masked_input_requests().items():
        payload = clients[u].masked_input(msg, inputs[u])
        prefix, _ = secagg._unpack(payload, 5, 5, 0, prefix=4 * LENGTH)
        uploads[u] = np.frombuffer(prefix, dtype="<u4")
    return uploads


def byte_pvalues(values: np.ndarray) -> tuple[float, float]:
    """Chi-square p-values of the low and the high byte against the uniform distribution."""
    low = np.bincount(values & 0xFF, minlength=256)
    high = np.bincount(values >> 24, minlength=256)
    return stats.chisquare(low).pvalue, stats.chisquare(high).pvalue


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("dropped", "late"), [(set(), set()), ({7, 21}, set()), ({7, 21}, {3}), (set(), {11, 40})]
)
def test_sum_is_exact_with_and_without_dropouts(dropped: set[int], late: set[int]) -> None:
    # Prepare: 6 clients' float vectors, fixed-point encoded
    clip, bits = 1.0, 16
    floats = float_inputs()
    encoded = {u: encode_vector(torch.from_numpy(v) if u % 2 else v, clip, bits) for u, v in floats.items()}
    # Execute: 2 drop after sharing (stage 2), some others vanish before unmasking (still counted)
    ring_sum = run_local(encoded, dropped, 3, drop_before_unmask=late, random_bytes=seeded(1))
    # Assert: the ring sum is the integer sum; the decoded float sum is within the quantization bound
    survivors = [u for u in UIDS if u not in dropped]
    assert ring_sum.dtype == np.uint32
    np.testing.assert_array_equal(ring_sum, sum(encoded[u].astype(np.int64) for u in survivors))
    decoded = decode_sum(ring_sum, len(survivors), clip, bits)
    exact = sum(np.clip(floats[u], -clip, clip) for u in survivors)
    assert np.abs(decoded - exact).max() <= len(survivors) * clip / (2**bits - 1) + 1e-9


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_dropouts_give_exact_sum(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 7), label="clients")
    threshold = data.draw(st.integers(1, n), label="threshold")
    uids = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True), label="uids")
    length = data.draw(st.integers(0, 20), label="length")
    values = st.lists(st.integers(0, 2**16 - 1), min_size=length, max_size=length)
    inputs = {u: np.array(data.draw(values), dtype=np.int64) for u in uids}
    dropped = data.draw(st.sets(st.sampled_from(uids), max_size=n - threshold), label="dropped")
    alive = [u for u in uids if u not in dropped]
    late = data.draw(st.sets(st.sampled_from(alive), max_size=len(alive) - threshold), label="late")
    total = run_local(inputs, dropped, threshold, drop_before_unmask=late, round_=data.draw(st.integers(0, 99)))
    expected = sum((inputs[u].astype(np.int64) for u in alive), np.zeros(length, np.int64)) % 2**32
    np.testing.assert_array_equal(total, expected)


def test_sum_wraps_modulo_ring() -> None:
    inputs = {1: np.full(4, 2**32 - 1, np.uint32), 2: np.full(4, 5, np.uint32)}
    np.testing.assert_array_equal(run_local(inputs, threshold=2), np.full(4, 4))


# ---------------------------------------------------------------- privacy of one upload


def test_masked_upload_is_uniform_on_ring() -> None:
    encoded = {u: encode_vector(v, 1.0, 16) for u, v in float_inputs().items()}
    upload = masked_uploads(encoded, seed=10)[UIDS[0]]
    assert min(byte_pvalues(upload)) > P_MIN
    # The same test catches a plain encoding: it can fail.
    assert min(byte_pvalues(encoded[UIDS[0]])) < 1e-12


def test_masked_uploads_of_different_inputs_are_indistinguishable() -> None:
    # Prepare: one client sends all zeros, another the largest 16-bit value everywhere
    zeros, big = np.zeros(LENGTH, np.uint32), np.full(LENGTH, 2**16 - 1, np.uint32)
    inputs = {u: (zeros if i % 2 == 0 else big) for i, u in enumerate(UIDS)}
    # Execute
    uploads = masked_uploads(inputs, seed=20)
    a, b = uploads[UIDS[0]], uploads[UIDS[1]]
    # Assert: masked, the two-sample tests see one distribution; unmasked, they see two
    assert stats.ks_2samp(a, b).pvalue > P_MIN
    table = [np.bincount(x >> 24, minlength=256) for x in (a, b)]
    assert stats.chi2_contingency(table).pvalue > P_MIN
    assert min(byte_pvalues(a) + byte_pvalues(b)) > P_MIN
    assert stats.ks_2samp(zeros, big).pvalue < 1e-12


# ---------------------------------------------------------------- errors


def test_too_many_dropouts_before_masking() -> None:
    inputs = {u: np.arange(8) for u in UIDS}
    with pytest.raises(SecAggAbort, match="3 clients sent masked inputs, threshold is 4"):
        run_local(inputs, {3, 7, 11}, 4)


def test_too_many_dropouts_before_unmasking() -> None:
    inputs = {u: np.arange(8) for u in UIDS}
    with pytest.raises(SecAggAbort, match="2 clients answered the unmask request, threshold is 3"):
        run_local(inputs, {3}, 3, drop_before_unmask={7, 11, 20})


def test_too_few_advertisers_and_client_side_refusal() -> None:
    server = SecAggServer(0, threshold=3, length=2)
    clients = {u: SecAggClient(u, 0) for u in (1, 2, 3)}
    for u in (1, 2):
        server.receive_advertise(u, clients[u].advertise())
    with pytest.raises(SecAggAbort, match="2 clients advertised keys, threshold is 3"):
        server.share_requests()
    # A client refuses to unmask when the server lists fewer survivors than the threshold.
    server = SecAggServer(0, threshold=2, length=2)
    clients = {u: SecAggClient(u, 0) for u in (1, 2, 3)}
    for u, c in clients.items():
        server.receive_advertise(u, c.advertise())
    for u, msg in server.share_requests().items():
        server.receive_shares(u, clients[u].share(msg))
    for u, msg in server.masked_input_requests().items():
        clients[u].masked_input(msg, np.ones(2, np.uint32))
    lonely = secagg._pack(6, 0, {1: b""})
    with pytest.raises(SecAggAbort, match="1 survivors, threshold is 2"):
        clients[1].unmask(lonely)


def _through_stage_2(n: int = 4, threshold: int = 3) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, bytes]]:
    server = SecAggServer(1, threshold, length=16)
    clients = {u: SecAggClient(u, 1) for u in range(n)}
    for u, c in clients.items():
        server.receive_advertise(u, c.advertise())
    for u, msg in server.share_requests().items():
        server.receive_shares(u, clients[u].share(msg))
    return server, clients, server.masked_input_requests()


def test_tampered_ciphertext_is_rejected() -> None:
    _, clients, routed = _through_stage_2()
    tampered = bytearray(routed[0])
    tampered[-1] ^= 0x01  # last byte of the last ciphertext: its GCM tag
    with pytest.raises(SecAggMessageError, match="failed AES-GCM authentication") as err:
        clients[0].masked_input(bytes(tampered), np.zeros(16, np.uint32))
    assert isinstance(err.value, ValueError)
    # A ciphertext moved to another recipient fails too (it is bound to sender and recipient).
    _, clients, routed = _through_stage_2()
    with pytest.raises(SecAggMessageError, match="AES-GCM"):
        clients[1].masked_input(routed[0], np.zeros(16, np.uint32))


def test_corrupt_key_share_is_detected() -> None:
    server, clients, routed = _through_stage_2(n=5, threshold=3)
    for u in (0, 1, 2, 3):  # client 4 drops after sharing
        server.receive_masked_input(u, clients[u].masked_input(routed[u], np.ones(16, np.uint32)))
    for u, msg in server.unmask_requests().items():
        reply = bytearray(clients[u].unmask(msg))
        if u == 0:
            reply[-1] ^= 0x01  # the last record is client 4's key share
        server.receive_unmask(u, bytes(reply))
    with pytest.raises(SecAggAbort, match="key of client 4 did not reconstruct"):
        server.unmask()


def test_malformed_messages_raise_value_errors_and_keep_state() -> None:
    server, clients, routed = _through_stage_2()
    good = clients[0].masked_input(routed[0], np.arange(16))
    bad = [b"", b"junk", good[:-1], good + b"\x00", secagg._pack(5, 2, {}, bytes(64)), secagg._pack(3, 1, {}),
           secagg._pack(5, 1, {}, bytes(60)), bytearray(good)]
    for payload in bad[:-1]:
        with pytest.raises(SecAggMessageError):
            server.receive_masked_input(0, payload)
    with pytest.raises(SecAggMessageError, match="not expected or repeated"):
        server.receive_masked_input(99, good)
    server.receive_masked_input(0, bytes(bad[-1]))  # a bytearray of a valid message is fine
    with pytest.raises(SecAggMessageError, match="repeated"):
        server.receive_masked_input(0, good)
    with pytest.raises(SecAggMessageError, match="expecting secagg_unmask"):
        clients[0].share(b"")


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(max_size=300), cut=st.integers(0, 400))
def test_fuzzed_messages_only_raise_message_errors(junk: bytes, cut: int) -> None:
    server, clients, routed = _through_stage_2(n=3, threshold=2)
    for payload in (junk, routed[0][:cut] + junk):
        with pytest.raises(SecAggMessageError):
            server.receive_masked_input(0, payload)
        with pytest.raises(SecAggMessageError):
            SecAggClient(0, 1).share(payload)
        fresh = SecAggServer(1, 1, 16)
        with pytest.raises(SecAggMessageError):
            fresh.receive_advertise(0, payload)
        with pytest.raises((SecAggMessageError, SecAggAbort)):
            _through_stage_2(n=3, threshold=2)[1][0].masked_input(payload, np.zeros(16, np.uint32))


# ---------------------------------------------------------------- building blocks


def test_fixed_point_roundtrip_and_overflow_bound() -> None:
    values = np.array([-5.0, -1.0, -0.3, 0.0, 0.3, 1.0, 5.0])
    for bits in (8, 16, 24):
        ring = encode_vector(values, 1.0, bits)
        assert ring.max() <= 2**bits - 1
        back = decode_sum(ring, 1, 1.0, bits)
        assert np.abs(back - np.clip(values, -1, 1)).max() <= 1.0 / (2**bits - 1) + 1e-12
    assert max_clients(16) == 65537 and max_clients(31) == 2
    with pytest.raises(ValueError, match="can wrap the ring"):
        decode_sum(np.zeros(3), 65538, 1.0, 16)
    with pytest.raises(ValueError, match="NaN"):
        encode_vector(np.array([0.0, np.nan]), 1.0)
    with pytest.raises(ValueError, match="integer vector"):
        run_local({1: np.zeros(3), 2: np.zeros(3)}, threshold=2)


def test_shamir_any_threshold_subset_recovers() -> None:
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir.split(secret, [1, 2, 3, 4, 5], threshold=3)
    rng = random.Random(0)
    for _ in range(10):
        assert shamir.combine(rng.sample(shares, 3)) == secret
    assert shamir.combine(shares[:2]) != secret
    assert shamir.Share.from_bytes(shares[0].to_bytes()) == shares[0]
    with pytest.raises(ValueError, match="70 bytes"):
        shamir.Share.from_bytes(b"\x01" * 10)
