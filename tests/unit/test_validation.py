"""Trust: what a client sends is checked before it can reach the global state. Property-based tests
(hypothesis) feed arbitrary, truncated, bit-flipped and well-framed-but-lying payloads into every
decoder and assert the only failure is a PayloadError; the update validator and the reply envelope
check reject every perturbation and accept every honest update."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcustom.codecs import CodecChain, Link, RawCodec
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.runtime import Reply
from fedcustom.validation import check_envelope, default_max_bytes, validate_update

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECS = ["raw", "delta", "delta,topk:0.1", "int8", "int4", "fp16", "zstd", "delta,topk:0.1,int8,zstd"]
REFERENCE = {"w": torch.randn(6, 11, generator=torch.Generator().manual_seed(0)),
             "b": torch.randn(5, generator=torch.Generator().manual_seed(1)), "s": torch.tensor([0.5])}
# (codec name, whether the receiver's link holds a reference): delta chains decode differently with one
DECODERS = [("rawcodec", False)] + [(spec, ref) for spec in SPECS for ref in (False, True) if ref <= ("delta" in spec)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool]


def _codec(name: str) -> RawCodec | CodecChain:
    return RawCodec() if name == "rawcodec" else CodecChain(name)


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def _decode(name: str, with_reference: bool, payload: bytes) -> dict[str, torch.Tensor] | None:
    """Decode; None on PayloadError (after checking the link was left as it was). Any other exception fails."""
    link = Link(reference=_clone(REFERENCE) if with_reference else None)
    before = link.reference
    try:
        out = _codec(name).decode(payload, link)
    except PayloadError:
        assert link.reference is before, "a rejected payload must not move the receiver's reference"
        return None
    assert isinstance(out, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())
    return out


def _decode_and_validate(name: str, with_reference: bool, payload: bytes) -> bool:
    """Whether the server would accept ``payload``; only PayloadError/UpdateRejected may say no."""
    state = _decode(name, with_reference, payload)
    if state is None:
        return False
    try:
        validate_update(state, REFERENCE)
    except UpdateRejected:
        return False
    return True


def _honest(name: str, with_reference: bool, state: dict[str, torch.Tensor], compress: bool = True) -> bytes:
    """What an honest sender whose link agrees with the receiver's would send for ``state``."""
    codec = _codec(name)
    if not compress and isinstance(codec, CodecChain):
        codec = CodecChain(dataclasses.replace(codec.spec, zstd=False))
    return codec.encode(state, Link(reference=_clone(REFERENCE) if with_reference else None))


@functools.cache
def _honest_reference(name: str, with_reference: bool, compress: bool = True) -> bytes:
    """:func:`_honest` for REFERENCE, computed once: safetensors writes its metadata in hash order, so
    two encodings of one state can differ in bytes, and hypothesis needs the same seed every time."""
    return _honest(name, with_reference, REFERENCE, compress)


def _compress_if_zstd(name: str, raw: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(raw) if "zstd" in name else raw


@st.composite
def _mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, bit-flipped, overwritten, spliced or extended, a few times over."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete", "append"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "truncate":
            del out[pos:]
        elif op == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        elif op == "append":
            out += draw(st.binary(max_size=16))
    return bytes(out)


BITS = {"F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32, "F16": 16, "BF16": 16,
        "I16": 16, "U16": 16, "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6,
        "F4": 4, "XX": 8}


@st.composite
def _handwritten(draw: st.DrawFn) -> bytes:
    """A safetensors blob written by hand: exotic dtypes and shapes, offsets laid out consistently
    (so the parser accepts the framing) unless one is drawn out of place."""
    header, offset = {}, 0
    for key in draw(st.lists(TENSOR_KEY, max_size=3, unique=True)):
        dtype, shape = draw(st.sampled_from(sorted(BITS))), draw(st.lists(st.integers(0, 6), max_size=3))
        size = -(-math.prod(shape) * BITS[dtype] // 8)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if header and draw(st.integers(0, 3)) == 0:
        offsets = draw(st.lists(st.integers(-1, 2**64), max_size=3))
        header[draw(st.sampled_from(sorted(header)))]["data_offsets"] = offsets
    metadata = draw(st.none() | st.dictionaries(st.sampled_from(["shapes", "chain"]), st.text(max_size=20)))
    header.update({"__metadata__": metadata} if metadata is not None else {})
    blob = json.dumps(header).encode()
    size = offset + (draw(st.integers(0, 9)) == 0)
    return struct.pack("<Q", len(blob)) + blob + draw(st.binary(min_size=size, max_size=size))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                    max_leaves=12)
DIM = st.one_of(st.integers(-2, 12), st.sampled_from([2**31, 2**62, 2**63, 2**70]), st.booleans(), st.floats(0, 4),
                st.text(max_size=2))
TENSOR_KEY = st.builds(lambda n, r: f"{n}::{r}", st.sampled_from(["w", "b", "s", "x", "w::values", ""]),
                       st.sampled_from(["values", "scales", "indices", "junk"]))


@st.composite
def _tensor(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 9), max_size=3))
    values = torch.randint(-200, 200, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    tensor = values.to(draw(st.sampled_from(DTYPES)))
    if tensor.is_floating_point() and tensor.numel() and draw(st.booleans()):
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, 1e30]))
    return tensor


@st.composite
def _lying_payload(draw: st.DrawFn, name: str, with_reference: bool) -> bytes:
    """Valid safetensors whose tensors or shape table are wrong: starts from an honest payload's
    parts and shape table and perturbs them, or writes a header by hand."""
    if draw(st.integers(0, 3)) == 0:  # hand-written header: exotic dtypes, offsets and shapes
        return _compress_if_zstd(name, draw(_handwritten()))
    raw = _honest_reference(name, with_reference, compress=False)
    tensors = st_load(raw)
    shapes = {k: list(v.shape) for k, v in REFERENCE.items()}
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add", "shape", "table"]))
        key = draw(st.sampled_from(sorted(tensors) or ["w::values"]))
        if op in ("replace", "add"):
            tensors[key if op == "replace" else draw(TENSOR_KEY)] = draw(_tensor())
        elif op == "drop":
            tensors.pop(key, None)
        elif op == "shape" and isinstance(shapes, dict):
            shapes[draw(st.sampled_from(["w", "b", "s", "x"]))] = draw(st.lists(DIM, max_size=4))
        else:
            shapes = draw(JSON)
    table = json.dumps(shapes) if draw(st.integers(0, 9)) else "[" * 5000 + "]" * 5000
    metadata = {"shapes": table, "chain": name} if draw(st.integers(0, 9)) else {"chain": name}
    return _compress_if_zstd(name, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


# --- decoders: no malformed payload gets anything but a PayloadError ---------------------------------------------


@FUZZ
@given(case=st.sampled_from(DECODERS), payload=st.binary(max_size=600))
def test_arbitrary_bytes_only_ever_raise_payload_errors(case: tuple[str, bool], payload: bytes) -> None:
    name, with_reference = case
    _decode_and_validate(name, with_reference, payload)


@FUZZ
@given(case=st.sampled_from(DECODERS), inner=st.booleans(), data=st.data())
def test_truncated_or_bit_flipped_payloads_only_ever_raise_payload_errors(case: tuple[str, bool], inner: bool,
                                                                          data: st.DataObject) -> None:
    # Prepare: corrupt the compressed bytes, or the safetensors inside them (then compress honestly)
    name, with_reference = case
    if inner:
        payload = _compress_if_zstd(name, data.draw(_mutated(_honest_reference(name, with_reference, compress=False))))
    else:
        payload = data.draw(_mutated(_honest_reference(name, with_reference)))
    # Execute / Assert: decoding and validating either accept or say why, nothing else
    _decode_and_validate(name, with_reference, payload)


@FUZZ
@given(case=st.sampled_from(DECODERS), data=st.data())
def test_valid_safetensors_with_lying_metadata_only_ever_raise_payload_errors(case: tuple[str, bool],
                                                                              data: st.DataObject) -> None:
    name, with_reference = case
    _decode_and_validate(name, with_reference, data.draw(_lying_payload(name, with_reference)))


@pytest.mark.parametrize("case", [("rawcodec", False), ("raw", False), ("delta", True),
                                  ("delta,topk:0.1,int8,zstd", True)])
@settings(FUZZ, max_examples=150)
@given(blob=_handwritten())
def test_handwritten_safetensors_headers_only_ever_raise_payload_errors(case: tuple[str, bool], blob: bytes) -> None:
    name, with_reference = case  # dtypes torch lacks (F8_E8M0, F4) raised KeyError from the raw codec
    _decode_and_validate(name, with_reference, _compress_if_zstd(name, blob))


@FUZZ
@given(case=st.sampled_from(DECODERS), shapes=st.fixed_dictionaries(
    {}, optional={n: st.lists(st.integers(0, 7), max_size=3) for n in ("w", "b", "s", "extra")}))
def test_a_wrong_shape_state_is_refused_by_decode_or_validation(case: tuple[str, bool],
                                                                shapes: dict[str, list[int]]) -> None:
    # Prepare: a client whose model has other tensor names or shapes, encoding honestly
    name, with_reference = case
    state = {k: torch.randn(s) for k, s in shapes.items()}
    matches = {k: list(v.shape) for k, v in state.items()} == {k: list(v.shape) for k, v in REFERENCE.items()}
    payload = _honest(name, with_reference and matches, state)  # a sender with our reference needs our shapes
    # Execute / Assert: accepted exactly when the names and shapes are the reference's
    assert _decode_and_validate(name, with_reference, payload) == matches


def test_a_zstd_frame_cannot_make_the_receiver_allocate_more_than_its_limit() -> None:
    # Prepare: 16 bytes claiming 1 TiB (this raised MemoryError before the claim was checked), a real
    # 10 MB frame, and the same without a stated size, against a 1 MB limit
    liar = b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", 2**40) + b"\x01\x00\x00"
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10_000_000)
    chain = CodecChain("zstd", max_decoded_bytes=2**20)
    # Execute / Assert
    with pytest.raises(PayloadError, match="claims 1099511627776 bytes"):
        CodecChain("delta,zstd").decode(liar)
    with pytest.raises(PayloadError, match="claims 10000000 bytes decompressed, over the limit of 1048576"):
        chain.decode(bomb)
    with pytest.raises(PayloadError, match="not a valid zstd frame"):
        chain.decode(unsized)
    with pytest.raises(PayloadError, match="exceeds the decode limit"):
        CodecChain("raw", max_decoded_bytes=100).decode(_honest("raw", False, REFERENCE))


# --- validate_update ------------------------------------------------------------------------------------------------

MIXED = {"w": torch.zeros(4, 3), "h": torch.zeros(7, dtype=torch.float16), "n": torch.zeros(2, 2, dtype=torch.int64),
         "s": torch.zeros(())}


@st.composite
def _honest_update(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-8, 1.0, 1e4]))
    return {k: (torch.randn(v.shape, generator=gen) * scale).to(v.dtype) for k, v in MIXED.items()}


@FUZZ
@given(update=_honest_update())
def test_an_update_with_the_references_names_shapes_and_dtypes_is_accepted(update: dict[str, torch.Tensor]) -> None:
    validate_update(update, MIXED)


@FUZZ
@given(update=_honest_update(), op=st.sampled_from(["drop", "add", "reshape", "retype", "not a tensor"]),
       name=st.sampled_from(sorted(MIXED)), data=st.data())
def test_any_name_shape_or_dtype_perturbation_is_rejected(update: dict[str, torch.Tensor], op: str, name: str,
                                                          data: st.DataObject) -> None:
    # Prepare
    if op == "drop":
        del update[name]
    elif op == "add":
        update[data.draw(st.text(max_size=6).filter(lambda n: n not in MIXED))] = torch.zeros(1)
    elif op == "reshape":
        shape = data.draw(st.lists(st.integers(0, 5), max_size=3).filter(lambda s: tuple(s) != MIXED[name].shape))
        update[name] = torch.zeros(shape, dtype=MIXED[name].dtype)
    elif op == "retype":
        update[name] = update[name].to(data.draw(st.sampled_from([d for d in DTYPES if d != MIXED[name].dtype])))
    else:
        update[name] = data.draw(st.sampled_from([None, 1.0, [1.0], update[name].numpy()]))
    # Execute / Assert
    with pytest.raises(UpdateRejected, match=name if op != "add" else "unexpected"):
        validate_update(update, MIXED)


@FUZZ
@given(update=_honest_update(), name=st.sampled_from(["w", "h", "s"]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), data=st.data())
def test_nan_or_inf_anywhere_in_a_float_tensor_is_rejected(update: dict[str, torch.Tensor], name: str, bad: float,
                                                           data: st.DataObject) -> None:
    flat = update[name].view(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = bad
    with pytest.raises(UpdateRejected, match=f"{name}: contains NaN or Inf"):
        validate_update(update, MIXED)


# --- check_envelope and default_max_bytes ---------------------------------------------------------------------------

METRIC = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**30), st.booleans(),
                   st.text(max_size=3), st.none())


@FUZZ
@given(size=st.integers(0, 300), max_bytes=st.none() | st.integers(0, 300), rnd=st.none() | st.integers(0, 6),
       expected=st.integers(1, 5), num_examples=st.one_of(st.integers(-3, 10**12), st.floats(-1, 5), st.booleans(),
                                                          st.none()),
       metrics=st.dictionaries(st.text(max_size=5), METRIC, max_size=3), error=st.none() | st.text(max_size=5))
def test_check_envelope_rejects_exactly_the_bad_replies(
        size: int, max_bytes: int | None, rnd: int | None, expected: int, num_examples: object, metrics: dict,
        error: str | None) -> None:
    # Prepare: what the rules say, written out independently
    reply = Reply(payload=b"x" * size, num_examples=num_examples, metrics=metrics, error=error, round=rnd)
    bad_metric = any(isinstance(v, (str, type(None))) or (isinstance(v, float) and not math.isfinite(v)) or v < 0
                     for v in metrics.values())
    bad_count = type(num_examples) is not int or num_examples <= 0
    too_big = max_bytes is not None and size > max_bytes
    reasons = [bool(error), too_big, rnd not in (None, expected), bad_count, bad_metric]
    # Execute / Assert
    if any(reasons):
        with pytest.raises(UpdateRejected) as caught:
            check_envelope(reply, expected, max_bytes)
        if not error and reasons[1]:
            assert str(caught.value) == f"payload of {size} bytes exceeds the limit of {max_bytes} bytes"
        elif reasons.index(True) == 2:
            assert f"round {rnd}" in str(caught.value) and ("stale" in str(caught.value)) == (rnd < expected)
    else:
        check_envelope(reply, expected, max_bytes)


@FUZZ
@given(shapes=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=2), min_size=1, max_size=4),
       spec=st.sampled_from(["rawcodec", *SPECS, "delta,topk:1", "delta,topk:1,zstd"]), seed=st.integers(0, 99))
def test_every_honest_encoding_fits_the_default_size_limit(shapes: list[list[int]], spec: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = {f"layer.{i}.weight": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    sender = Link(reference={k: torch.randn(v.shape, generator=gen) for k, v in state.items()})  # topk goes sparse
    assert len(_codec(spec).encode(state, sender)) <= default_max_bytes(state)


def test_default_max_bytes_is_twice_the_values_plus_header_room() -> None:
    state = {"a": torch.zeros(1000), "b": torch.zeros(10, dtype=torch.float64), "c": torch.zeros(4, dtype=torch.int8)}
    assert default_max_bytes(state) == 2 * (4000 + 80 + 16) + 2**20 + 3 * 1024


# --- Flower records carry the round ---------------------------------------------------------------------------------


def test_the_reply_round_survives_flower_records_and_old_records_decode_to_none() -> None:
    pytest.importorskip("flwr", reason="Flower is an optional extra")
    from flwr.app import ConfigRecord, RecordDict

    from fedcustom.runtime.flower.records import REPLY, ROUND, content_to_reply, reply_to_content

    reply = Reply(payload=b"abc", num_examples=3, metrics={"train_loss": 0.5}, round=7)
    old = reply_to_content(Reply(payload=b"abc", num_examples=3))
    assert ROUND not in old[REPLY] and content_to_reply(old).round is None
    assert content_to_reply(reply_to_content(reply)) == reply
    for status in ({"num_examples": "3", "error": ""}, {"error": ""}, {"num_examples": 3, "error": "", ROUND: "7"},
                   {"num_examples": [3], "error": ""}):
        assert "malformed reply content" in content_to_reply(RecordDict({REPLY: ConfigRecord(status)})).error
