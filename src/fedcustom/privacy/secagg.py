"""Secure aggregation by pairwise additive masking with dropout recovery.

K. Bonawitz, V. Ivanov, B. Kreuter, A. Marcedone, H. B. McMahan, S. Patel, D. Ramage, A. Segal,
K. Seth, "Practical Secure Aggregation for Privacy-Preserving Machine Learning", ACM CCS 2017 —
the semi-honest variant (no signatures, no consistency-check round). The server learns only the sum
of the vectors of the clients that reached stage 3, and only if at least ``threshold`` of them answer
stage 4; the server together with fewer than ``threshold`` clients learns nothing more. Pick
threshold > n/2 (``run_local``'s default) as the paper does.

Stages (message kinds ADVERTISE, SHARE, MASKED, UNMASK below; every payload is plain bytes):
  1. ADVERTISE  server -> b"";            client -> its two X25519 public keys (c: encryption, s: masks)
  2. SHARE      server -> roster;         client -> AES-GCM ciphertexts of Shamir shares of (b_u, s_sk_u),
                                                    one per roster member, key = HKDF(X25519(c_u, c_v))
  3. MASKED     server -> the ciphertexts addressed to u;
                client -> y_u = x_u + PRG(b_u) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv)
  4. UNMASK     server -> the stage-3 survivors;
                client -> its shares of b_v for survivors v and of s_sk_v for clients dropped in stage 3.

Ring: Z_{2^32}, as numpy uint32 arithmetic (wraps silently). PRG: the AES-256-CTR keystream under a
32-byte seed (a real PRG, and ~GB/s with AES-NI). Pairwise seeds s_uv = HKDF(X25519(s_u, s_v)) bound
to the round and the unordered pair. Fixed point (``encode_vector``/``decode_sum``): clip to [-c, c] and
map affinely onto {0, ..., 2^bits - 1}; a sum of N <= (2^32 - 1) // (2^bits - 1) encodings cannot wrap,
and the decoded float sum is within N * c / (2^bits - 1) of the sum of clipped inputs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcustom.errors import PayloadError
from fedcustom.privacy import shamir
from fedcustom.privacy.shamir import RandomBytes, Share

ADVERTISE, SHARE, MASKED, UNMASK = "secagg_advertise", "secagg_share", "secagg_masked_input", "secagg_unmask"
RING_BITS = 32
_MAGIC = b"SAG1"
_HEADER = struct.Struct(">4sBQ")  # magic, message tag, round
_TAGS = {1: "advertise", 2: "roster", 3: "shares", 4: "routed shares", 5: "masked input", 6: "survivors", 7: "unmask"}
_KEY, _NONCE = 32, 12
_CT_BYTES = _NONCE + 2 * shamir.SHARE_BYTES + 16  # nonce, (share of b_u, share of s_sk_u), GCM tag
_SELF_MASK, _PAIR_KEY = 0, 1  # which secret an unmask entry reveals


class SecAggMessageError(PayloadError):
    """A secure-aggregation message is malformed, out of protocol, or fails authentication."""


class SecAggAbort(RuntimeError):
    """Too few clients remain (fewer than the threshold) or a reconstruction failed: no sum."""


# ------------------------------------------------------------ wire format
# Every message: header (magic, tag, round), a fixed-size prefix, a record count, then records
# (uid: u64, blob of a fixed size) in strictly increasing uid order. Big-endian throughout.


def _pack(tag: int, round_: int, records: Mapping[int, bytes], prefix: bytes = b"") -> bytes:
    body = b"".join(_u64(u) + records[u] for u in sorted(records))
    return _HEADER.pack(_MAGIC, tag, round_) + prefix + len(records).to_bytes(4, "big") + body


def _unpack(data: bytes, tag: int, round_: int, blob: int, prefix: int = 0) -> tuple[bytes, dict[int, bytes]]:
    """Parse and check one message; returns (prefix bytes, {uid: blob}) or raises SecAggMessageError."""
    what = f"secagg {_TAGS[tag]} message"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SecAggMessageError(f"{what}: expected bytes, got {type(data).__name__}")
    data, head = bytes(data), _HEADER.size + prefix + 4
    if len(data) < head:
        raise SecAggMessageError(f"{what}: truncated ({len(data)} bytes, the header alone is {head})")
    magic, got, got_round = _HEADER.unpack_from(data)
    if magic != _MAGIC or got != tag:
        raise SecAggMessageError(f"{what}: got {_TAGS.get(got, 'unknown') if magic == _MAGIC else 'foreign'} bytes")
    if got_round != round_:
        raise SecAggMessageError(f"{what}: is for round {got_round}, this is round {round_}")
    n, item = int.from_bytes(data[head - 4 : head], "big"), 8 + blob
    if len(data) != head + n * item:
        raise SecAggMessageError(f"{what}: {len(data)} bytes, expected {head + n * item} for {n} records")
    uids = [int.from_bytes(data[i : i + 8], "big") for i in range(head, len(data), item)]
    if any(a >= b for a, b in zip(uids, uids[1:])):
        raise SecAggMessageError(f"{what}: client ids are not sorted and unique")
    blobs = {u: data[head + k * item + 8 : head + (k + 1) * item] for k, u in enumerate(uids)}
    return data[_HEADER.size : head - 4], blobs


def _u64(uid: int) -> bytes:
    if not 0 <= uid < 2**64:
        raise ValueError(f"client ids must fit in an unsigned 64-bit integer, got {uid}")
    return uid.to_bytes(8, "big")


def prg(seed: bytes, length: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` uniform ring elements (AES-256-CTR keystream)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def _agree(sk: X25519PrivateKey, pk: bytes, label: bytes, round_: int, u: int, v: int) -> bytes:
    """A 32-byte key shared by u and v: HKDF over X25519, bound to label, round and the pair."""
    try:
        secret = sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as err:  # low-order point: all-zero shared secret
        raise SecAggMessageError(f"unusable public key for client pair ({u}, {v}): {err}") from err
    info = b"fedcustom-secagg/" + label + struct.pack(">QQQ", round_, min(u, v), max(u, v))
    return HKDF(algorithm=hashes.SHA256(), length=_KEY, salt=None, info=info).derive(secret)


def _aad(round_: int, sender: int, recipient: int) -> bytes:
    return struct.pack(">QQQ", round_, sender, recipient)


def _as_ring(vector: np.ndarray | torch.Tensor) -> np.ndarray:
    """Check that ``vector`` holds ring integers (e.g. from ``encode_vector``) and return uint32."""
    arr = vector.detach().cpu().numpy() if isinstance(vector, torch.Tensor) else np.asarray(vector)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-D integer vector of ring elements, got {arr.dtype} of shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**RING_BITS):
        raise ValueError(f"ring elements must lie in [0, 2^{RING_BITS}); encode floats with encode_vector")
    return arr.astype(np.uint32)


# ------------------------------------------------------------ client


class SecAggClient:
    """One client's state for one round; methods are the four stages, in order, bytes in and out."""

    def __init__(self, uid: int, round_: int, random_bytes: RandomBytes = os.urandom) -> None:
        _u64(uid)
        self.uid, self.round, self._rand = uid, round_, random_bytes
        self._c_sk = X25519PrivateKey.from_private_bytes(random_bytes(_KEY))  # encrypts shares
        self._s_sk = X25519PrivateKey.from_private_bytes(random_bytes(_KEY))  # agrees pairwise masks
        self._pks = self._c_sk.public_key().public_bytes_raw() + self._s_sk.public_key().public_bytes_raw()
        self._stage, self._threshold, self._b = ADVERTISE, 0, b""
        self._roster: dict[int, bytes] = {}  # uid -> c_pk + s_pk
        self._shares: dict[int, tuple[Share, Share]] = {}  # sender -> (share of b, share of s_sk)

    def _expect(self, stage: str, following: str) -> None:
        if self._stage != stage:
            raise SecAggMessageError(f"client {self.uid} got a {stage} message while expecting {self._stage}")
        self._stage = following  # a rejected message still ends the client's round: no retries

    def advertise(self) -> bytes:
        """Stage 1: the public keys c_pk (share encryption) and s_pk (mask agreement)."""
        self._expect(ADVERTISE, SHARE)
        return _pack(1, self.round, {}, self._pks)

    def share(self, roster: bytes) -> bytes:
        """Stage 2: Shamir-share b_u and s_sk_u among the roster, each share encrypted for its holder."""
        self._expect(SHARE, MASKED)
        prefix, self._roster = _unpack(roster, 2, self.round, 2 * _KEY, prefix=4)
        self._threshold, n = int.from_bytes(prefix, "big"), len(self._roster)
        if not 1 <= self._threshold <= n:
            raise SecAggMessageError(f"secagg roster: threshold {self._threshold} is not in [1, {n}]")
        keys = {pks[i : i + _KEY] for pks in self._roster.values() for i in (0, _KEY)}
        if self._roster.get(self.uid) != self._pks or len(keys) != 2 * n:
            raise SecAggMessageError(f"secagg roster: lacks client {self.uid}'s keys or repeats a key")
        self._b = self._rand(_KEY)
        secrets = (int.from_bytes(self._b, "big"), int.from_bytes(self._s_sk.private_bytes_raw(), "big"))
        xs = list(range(1, n + 1))  # client k in sorted roster order holds the point x = k + 1
        b_shares, sk_shares = (shamir.split(s, xs, self._threshold, self._rand) for s in secrets)
        cts = {}
        for v, b_share, sk_share in zip(sorted(self._roster), b_shares, sk_shares):
            key = _agree(self._c_sk, self._roster[v][:_KEY], b"enc", self.round, self.uid, v)
            nonce = self._rand(_NONCE)
            plain = b_share.to_bytes() + sk_share.to_bytes()
            cts[v] = nonce + AESGCM(key).encrypt(nonce, plain, _aad(self.round, self.uid, v))
        return _pack(3, self.round, cts)

    def masked_input(self, routed: bytes, vector: np.ndarray | torch.Tensor) -> bytes:
        """Stage 3: decrypt the shares addressed to us, upload y_u (4 bytes per element, little-endian)."""
        self._expect(MASKED, UNMASK)
        x = _as_ring(vector)
        self._shares = self._open_shares(routed)
        y = x + prg(self._b, x.size)
        for v in self._shares:
            if v != self.uid:
                mask = prg(_agree(self._s_sk, self._roster[v][_KEY:], b"mask", self.round, self.uid, v), x.size)
                y = y + mask if v < self.uid else y - mask
        return _pack(5, self.round, {}, y.astype("<u4").tobytes())

    def _open_shares(self, routed: bytes) -> dict[int, tuple[Share, Share]]:
        what = "secagg routed shares message"
        cts = _unpack(routed, 4, self.round, _CT_BYTES)[1]
        if not set(cts) <= set(self._roster) or self.uid not in cts:
            raise SecAggMessageError(f"{what}: senders must be roster members, including client {self.uid}")
        if len(cts) < self._threshold:
            raise SecAggAbort(f"secagg round {self.round}: {len(cts)} clients shared, threshold is {self._threshold}")
        my_x, shares = sorted(self._roster).index(self.uid) + 1, {}
        for v, ct in cts.items():
            key = _agree(self._c_sk, self._roster[v][:_KEY], b"enc", self.round, self.uid, v)
            try:
                plain = AESGCM(key).decrypt(ct[:_NONCE], ct[_NONCE:], _aad(self.round, v, self.uid))
                pair = (Share.from_bytes(plain[: shamir.SHARE_BYTES]), Share.from_bytes(plain[shamir.SHARE_BYTES :]))
            except InvalidTag:
                raise SecAggMessageError(f"{what}: ciphertext from client {v} failed AES-GCM authentication") from None
            except ValueError as err:
                raise SecAggMessageError(f"{what}: client {v} sent a malformed share: {err}") from None
            if pair[0].x != my_x or pair[1].x != my_x:
                raise SecAggMessageError(f"{what}: client {v} sent shares for point {pair[0].x}, expected {my_x}")
            shares[v] = pair
        return shares

    def unmask(self, survivors: bytes) -> bytes:
        """Stage 4: reveal shares of b_v for survivors and of s_sk_v for stage-3 dropouts, never both."""
        self._expect(UNMASK, "done")
        alive = set(_unpack(survivors, 6, self.round, 0)[1])
        if not alive <= set(self._shares) or self.uid not in alive:
            raise SecAggMessageError(f"secagg survivors message: must be sharers, including client {self.uid}")
        if len(alive) < self._threshold:
            raise SecAggAbort(f"secagg round {self.round}: {len(alive)} survivors, threshold is {self._threshold}")
        which = {v: _SELF_MASK if v in alive else _PAIR_KEY for v in self._shares}
        return _pack(7, self.round, {v: bytes([w]) + self._shares[v][w].to_bytes() for v, w in which.items()})


# ------------------------------------------------------------ server


class SecAggServer:
    """Routes one round's messages and unmasks the sum; never sees a key, seed or single input.

    ``*_requests()`` close a stage and return {client id: payload to send}; a ``receive_*`` that
    raises leaves the state untouched (treat that client as dropped). See ``run_local`` for the order.
    """

    def __init__(self, round_: int, threshold: int, length: int) -> None:
        if threshold < 1 or length < 0:
            raise ValueError(f"secagg needs threshold >= 1 and length >= 0, got {threshold} and {length}")
        self.round, self.threshold, self.length = round_, threshold, length
        self._stage = ADVERTISE
        self._keys: dict[int, bytes] = {}  # stage 1: uid -> c_pk + s_pk
        self._cts: dict[int, dict[int, bytes]] = {}  # stage 2: sender -> recipient -> ciphertext
        self._total = np.zeros(length, dtype=np.uint32)  # stage 3: running sum of masked inputs
        self._masked: list[int] = []
        self._revealed: dict[int, dict[int, Share]] = {}  # stage 4: responder -> owner -> share

    @property
    def survivors(self) -> list[int]:
        """Clients whose masked input arrived: the sum covers exactly these."""
        return sorted(self._masked)

    def _expect(self, stage: str, uid: int, seen: Iterable[int], allowed: Iterable[int]) -> None:
        if self._stage != stage:
            raise SecAggMessageError(f"secagg {stage} reply from client {uid}: that stage is not open")
        if uid in seen or uid not in allowed:
            raise SecAggMessageError(f"secagg {stage} reply from client {uid}: not expected or repeated")

    def _close(self, stage: str, following: str, remaining: int, what: str) -> None:
        if self._stage != stage:
            raise SecAggMessageError(f"secagg stage {stage} is not open (now at {self._stage})")
        if remaining < self.threshold:
            raise SecAggAbort(
                f"secure aggregation round {self.round} aborted: {remaining} clients {what}, threshold is "
                f"{self.threshold} (advertised {len(self._keys)}, shared {len(self._cts)}, "
                f"masked {len(self._masked)}, unmasked {len(self._revealed)})"
            )
        self._stage = following

    def receive_advertise(self, uid: int, payload: bytes) -> None:
        """Stage 1 reply: a client's two public keys."""
        self._expect(ADVERTISE, uid, self._keys, [uid] if 0 <= uid < 2**64 else [])
        self._keys[uid] = _unpack(payload, 1, self.round, 0, prefix=2 * _KEY)[0]

    def share_requests(self) -> dict[int, bytes]:
        """Close stage 1; the roster (threshold, then id, c_pk, s_pk per client) for every client."""
        self._close(ADVERTISE, SHARE, len(self._keys), "advertised keys")
        return dict.fromkeys(self._keys, _pack(2, self.round, self._keys, self.threshold.to_bytes(4, "big")))

    def receive_shares(self, uid: int, payload: bytes) -> None:
        """Stage 2 reply: one ciphertext per roster member (the server cannot read them)."""
        self._expect(SHARE, uid, self._cts, self._keys)
        cts = _unpack(payload, 3, self.round, _CT_BYTES)[1]
        if set(cts) != set(self._keys):
            raise SecAggMessageError(f"secagg shares from client {uid}: need one ciphertext per roster member")
        self._cts[uid] = cts

    def masked_input_requests(self) -> dict[int, bytes]:
        """Close stage 2; for each client that shared, the ciphertexts addressed to it."""
        self._close(SHARE, MASKED, len(self._cts), "sent shares")
        return {u: _pack(4, self.round, {v: self._cts[v][u] for v in self._cts}) for u in self._cts}

    def receive_masked_input(self, uid: int, payload: bytes) -> None:
        """Stage 3 reply: the masked vector y_u, added into the running sum."""
        self._expect(MASKED, uid, self._masked, self._cts)
        y = _unpack(payload, 5, self.round, 0, prefix=4 * self.length)[0]
        self._total += np.frombuffer(y, dtype="<u4")
        self._masked.append(uid)

    def unmask_requests(self) -> dict[int, bytes]:
        """Close stage 3; the survivor list for every survivor (the other sharers dropped)."""
        self._close(MASKED, UNMASK, len(self._masked), "sent masked inputs")
        return dict.fromkeys(self.survivors, _pack(6, self.round, dict.fromkeys(self._masked, b"")))

    def receive_unmask(self, uid: int, payload: bytes) -> None:
        """Stage 4 reply: shares of b_v for survivors v and of s_sk_v for dropped v."""
        self._expect(UNMASK, uid, self._revealed, self._masked)
        blobs = _unpack(payload, 7, self.round, 1 + shamir.SHARE_BYTES)[1]
        my_x, what = sorted(self._keys).index(uid) + 1, f"secagg unmask reply from client {uid}"
        if set(blobs) != set(self._cts):
            raise SecAggMessageError(f"{what}: need one share per client that shared")
        shares = {}
        for owner, blob in blobs.items():
            try:
                shares[owner] = Share.from_bytes(blob[1:])
            except ValueError as err:
                raise SecAggMessageError(f"{what}: {err}") from None
            if blob[0] != (_SELF_MASK if owner in self._masked else _PAIR_KEY) or shares[owner].x != my_x:
                raise SecAggMessageError(f"{what}: wrong secret or point revealed for client {owner}")
        self._revealed[uid] = shares

    def unmask(self) -> np.ndarray:
        """Close stage 4: reconstruct seeds and keys, remove every mask, return the uint32 sum."""
        self._close(UNMASK, "done", len(self._revealed), "answered the unmask request")
        helpers, total = sorted(self._revealed)[: self.threshold], self._total.copy()
        for v in sorted(self._cts):
            secret = self._reconstruct(v, helpers)
            if v in self._masked:
                total -= prg(secret, self.length)
                continue
            sk = X25519PrivateKey.from_private_bytes(secret)
            if sk.public_key().public_bytes_raw() != self._keys[v][_KEY:]:
                raise SecAggAbort(f"secagg round {self.round}: key of client {v} did not reconstruct (corrupt share)")
            for u in self._masked:  # y_u holds +PRG(s_uv) if v < u, else -PRG(s_uv)
                mask = prg(_agree(sk, self._keys[u][_KEY:], b"mask", self.round, u, v), self.length)
                total = total - mask if v < u else total + mask
        return total

    def _reconstruct(self, owner: int, helpers: list[int]) -> bytes:
        value = shamir.combine([self._revealed[w][owner] for w in helpers])
        if value >= 2 ** (8 * _KEY):
            raise SecAggAbort(f"secagg round {self.round}: seed of client {owner} did not reconstruct (corrupt share)")
        return value.to_bytes(_KEY, "big")


# ------------------------------------------------------------ fixed point and local driver


def max_clients(bits: int) -> int:
    """How many ``bits``-bit encodings can be summed in the ring without wrapping."""
    return (2**RING_BITS - 1) // (2**bits - 1)


def encode_vector(values: np.ndarray | torch.Tensor, clip_range: float, bits: int = 16) -> np.ndarray:
    """Clip floats to [-clip_range, clip_range] and round onto {0, ..., 2^bits - 1} (uint32, flattened)."""
    if not 1 <= bits < RING_BITS or not clip_range > 0:
        raise ValueError(f"need 1 <= bits < {RING_BITS} and clip_range > 0, got bits={bits}, clip_range={clip_range}")
    arr = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    arr = arr.astype(np.float64).ravel()
    if not np.isfinite(arr).all():
        raise ValueError("cannot encode NaN or infinite values for secure aggregation")
    scale = (2**bits - 1) / (2 * clip_range)
    return np.rint((np.clip(arr, -clip_range, clip_range) + clip_range) * scale).astype(np.uint32)


def decode_sum(ring_sum: np.ndarray, num_clients: int, clip_range: float, bits: int = 16) -> np.ndarray:
    """Turn the ring sum of ``num_clients`` encodings back into the float sum (float64)."""
    if not 1 <= num_clients <= max_clients(bits):
        raise ValueError(f"{num_clients} sums of {bits}-bit encodings can wrap the ring (at most {max_clients(bits)})")
    scale = (2**bits - 1) / (2 * clip_range)
    return np.asarray(ring_sum, dtype=np.float64) / scale - num_clients * clip_range


def run_local(
    inputs: Mapping[int, np.ndarray], drop_after_share: Iterable[int] = (), threshold: int | None = None, *,
    drop_before_unmask: Iterable[int] = (), round_: int = 0, random_bytes: RandomBytes = os.urandom,
) -> np.ndarray:
    """Run all four stages in memory on ring-int ``inputs``; return the survivors' sum (uint32).

    ``drop_after_share`` clients vanish before stage 3 (not in the sum); ``drop_before_unmask``
    ones vanish before stage 4 (still in the sum). ``threshold`` defaults to a majority.
    """
    uids = sorted(inputs)
    server = SecAggServer(round_, threshold or len(uids) // 2 + 1, len(inputs[uids[0]]) if uids else 0)
    clients = {u: SecAggClient(u, round_, random_bytes) for u in uids}
    gone_3, gone_4 = set(drop_after_share), set(drop_before_unmask)
    for u in uids:
        server.receive_advertise(u, clients[u].advertise())
    for u, msg in server.share_requests().items():
        server.receive_shares(u, clients[u].share(msg))
    for u, msg in server.masked_input_requests().items():
        if u not in gone_3:
            server.receive_masked_input(u, clients[u].masked_input(msg, inputs[u]))
    for u, msg in server.unmask_requests().items():
        if u not in gone_4:
            server.receive_unmask(u, clients[u].unmask(msg))
    return server.unmask()
