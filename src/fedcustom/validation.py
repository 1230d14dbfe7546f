"""Server-side checks on a client reply before its update may reach the strategy.

Two layers, both raising UpdateRejected with a reason the server logs: :func:`check_envelope` looks
at the reply itself before any decoding (payload size, round, example count, metrics), and
:func:`validate_update` at the decoded tensors (names, shapes, dtypes, finiteness). A rejected
update is dropped for the round; the round goes on with the other clients and the global state is
untouched.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from fedcustom.errors import UpdateRejected
from fedcustom.runtime.messages import Reply

MIB = 2**20
HEADER_ALLOWANCE = MIB  # safetensors JSON header, shape table, zstd framing
PER_TENSOR_ALLOWANCE = 1024  # header bytes per tensor name (name, dtype, shape, offsets, shape-table entry)


def check_envelope(reply: Reply, expected_round: int, max_bytes: int | None) -> None:
    """Raise UpdateRejected unless the reply is well-formed before decoding: the client reported no
    error, the payload (and its attachment, each) is at most ``max_bytes`` (None: no limit), it answers ``expected_round``,
    ``num_examples`` is a positive int and every metric is a finite, non-negative number.

    A reply without a round (``reply.round is None``) is accepted: clients older than the round
    field, and Flower records written by them, carry none. The transport still pairs each reply
    with the message it answers, so a missing round is not by itself a sign of a stale update;
    a round that is present and different is (a reply replayed or delayed from another round)."""
    if reply.error:
        raise UpdateRejected(f"client reported an error: {reply.error}")
    for what, size in (("payload", len(reply.payload)), ("attachment", len(reply.attachment))):
        if max_bytes is not None and size > max_bytes:
            raise UpdateRejected(f"{what} of {size} bytes exceeds the limit of {max_bytes} bytes")
    if reply.round is not None and reply.round != expected_round:
        when = "stale" if _is_int(reply.round) and reply.round < expected_round else "unexpected"
        raise UpdateRejected(f"{when} round: the reply answers round {reply.round!r}, expected round {expected_round}")
    if not _is_int(reply.num_examples) or reply.num_examples <= 0:
        raise UpdateRejected(f"num_examples must be a positive int, got {reply.num_examples!r}")
    if not isinstance(reply.metrics, dict):
        raise UpdateRejected(f"metrics must be a dict of numbers, got {type(reply.metrics).__name__}")
    for name, value in reply.metrics.items():
        if not isinstance(value, Real) or not (isinstance(value, int) or math.isfinite(value)) or value < 0:
            raise UpdateRejected(f"metric {name!r} must be a finite, non-negative number, got {value!r}")


def default_max_bytes(reference_state: dict[str, torch.Tensor]) -> int:
    """A payload size limit for updates of ``reference_state``: twice its size at 4 or more bytes
    per value, plus header room.

    Deliberately generous: it is there to stop a client from making the server buffer and decode
    gigabytes, not to police encodings. Every codec's honest payload fits well inside it: raw
    fp32 (1x), wider dtypes sent raw (fp64/int64: 2x), ``topk:1`` (4-byte values + int32 indices:
    2x), int8/int4 with their scales (< 1x), and zstd on incompressible data (a few bytes per
    block over 1x); the header room covers the safetensors JSON header and the chain's shape table."""
    values = sum(t.numel() * max(4, t.element_size()) for t in reference_state.values())
    return 2 * values + HEADER_ALLOWANCE + PER_TENSOR_ALLOWANCE * len(reference_state)


def validate_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Raise UpdateRejected unless ``update`` matches ``reference`` in names, shapes, dtypes, finiteness."""
    if not isinstance(update, dict):
        raise UpdateRejected(f"update must be a dict of named tensors, got {type(update).__name__}")
    missing = sorted(reference.keys() - update.keys())
    unexpected = sorted(map(repr, update.keys() - reference.keys()))
    if missing or unexpected:
        raise UpdateRejected(f"tensor names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, expected in reference.items():
        got = update[name]
        if not isinstance(got, torch.Tensor):
            raise UpdateRejected(f"{name}: expected a tensor, got {type(got).__name__}")
        if got.shape != expected.shape:
            raise UpdateRejected(f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        if got.dtype != expected.dtype:
            raise UpdateRejected(f"{name}: dtype {got.dtype}, expected {expected.dtype}")
        if (got.is_floating_point() or got.is_complex()) and not _all_finite(got):
            raise UpdateRejected(f"{name}: contains NaN or Inf")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A finite sum proves it (any NaN or Inf makes the sum NaN or Inf) at a fraction
    of the cost of an elementwise check; only a sum that overflowed needs the full check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _is_int(value: object) -> bool:
    """A true int (bools are ints to Python but not a count or a round)."""
    return isinstance(value, int) and not isinstance(value, bool)
