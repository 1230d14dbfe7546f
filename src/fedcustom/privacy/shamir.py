"""Shamir secret sharing over the prime field GF(2^521 - 1).

A. Shamir, "How to share a secret", CACM 22(11), 1979. A secret s is the constant term of a random
polynomial f of degree t-1; participant k holds the point (x_k, f(x_k)). Any t points determine f
(Lagrange interpolation at 0 gives s); any t-1 points are independent of s.

Secure aggregation (``privacy/secagg.py``) shares 32-byte secrets (a mask seed and an X25519 private
key). Written here rather than taken from a library because it is a few dozen lines, and the
packages that offer it either share byte-wise over GF(256) with their own share formats or are
unmaintained; we need plain (x, y) integers to put into our own wire format. The arithmetic is not
constant time, which is acceptable in the semi-honest setting (shares are only handled by parties
that are entitled to them, and timing is not observable to the aggregation server).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1  # Mersenne prime: every 32-byte secret (< 2^256) is a field element
Y_BYTES = 66  # ceil(521 / 8): big-endian width of a field element
SHARE_BYTES = 4 + Y_BYTES  # x as uint32, then y
_COEFF_BYTES = 80  # 640 random bits reduced mod PRIME: statistical distance to uniform < 2^-119

RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of a sharing polynomial; x is never 0 (f(0) is the secret)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """Fixed-width encoding: 4-byte x, 66-byte y, both big-endian."""
        return self.x.to_bytes(4, "big") + self.y.to_bytes(Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Inverse of ``to_bytes``; raises ValueError for a wrong length or out-of-field values."""
        if len(data) != SHARE_BYTES:
            raise ValueError(f"a Shamir share is {SHARE_BYTES} bytes, got {len(data)}")
        x, y = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
        if x == 0 or y >= PRIME:
            raise ValueError(f"Shamir share out of range (x={x}, y has {y.bit_length()} bits)")
        return cls(x, y)


def split(secret: int, xs: Sequence[int], threshold: int, random_bytes: RandomBytes = os.urandom) -> list[Share]:
    """Share ``secret`` at the points ``xs`` so that any ``threshold`` of them recover it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element (0 <= secret < 2^521 - 1)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}] (number of shares), got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < 2**32 for x in xs):
        raise ValueError("share points must be distinct integers in [1, 2^32)")
    # f(z) = secret + c_1 z + ... + c_{t-1} z^{t-1}, uniformly random coefficients
    coeffs = [secret] + [int.from_bytes(random_bytes(_COEFF_BYTES), "big") % PRIME for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coeffs, x)) for x in xs]


def combine(shares: Sequence[Share]) -> int:
    """Recover f(0) from shares with distinct x by Lagrange interpolation.

    Exactly the secret when at least ``threshold`` honest shares are given; with fewer (or corrupt
    ones) the result is an unrelated field element, which callers must detect by other means.
    """
    xs = [s.x for s in shares]
    if not shares or len(set(xs)) != len(xs):
        raise ValueError("need at least one share, all with distinct x")
    secret = 0
    for j, share in enumerate(shares):
        # Lagrange basis at 0: l_j(0) = prod_{m != j} x_m / (x_m - x_j)
        num, den = 1, 1
        for m, x_m in enumerate(xs):
            if m != j:
                num = num * x_m % PRIME
                den = den * (x_m - share.x) % PRIME
        secret = (secret + share.y * num * pow(den, -1, PRIME)) % PRIME
    return secret


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    """Horner evaluation of the polynomial with ``coeffs`` (constant term first) at x, mod PRIME."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc
