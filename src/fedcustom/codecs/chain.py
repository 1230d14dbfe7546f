"""Codec chains: ``delta,topk:0.01,int8,zstd`` turns named tensors into bytes, per link.

Stages, always applied in this order (a spec may name any subset):

- ``delta``: send the difference against the state both ends of the link agree on (the receiver's
  last reconstruction), not the state itself;
- ``topk:F``: keep the largest-magnitude fraction F of each tensor's values (indices as int32) with
  error feedback: what was not delivered — dropped values *and* quantization error — stays in a
  residual on the sender and is added to the next round's update;
- one value coding: ``fp16``, ``bf16``, ``int8`` or ``int4`` (blockwise absmax, codecs/quantize.py);
- ``zstd``: lossless compression of the final bytes.

``gradualdiff`` names GradualDiff-Fed (arXiv 2506.19164): ``delta,zstd`` (see README for what is
inferred). The wire format is safetensors (per tensor ``NAME::values``, ``NAME::scales``,
``NAME::indices``) with the original shapes in its metadata, so a payload is self-describing and
any malformed one is caught by :meth:`CodecChain.decode` as a PayloadError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import zstandard
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcustom.codecs.link import Link
from fedcustom.codecs.quantize import VALUE_CODINGS, dequantize, expected_parts, quantize
from fedcustom.codecs.raw import load_safetensors
from fedcustom.errors import ConfigError, PayloadError

State = dict[str, torch.Tensor]
PRESETS = {"raw": "", "gradualdiff": "delta,zstd"}
MAX_DECOMPRESSED = 16 * 2**30  # default decoded-size limit; a server sets its own (validation.default_max_bytes)
MAX_DIMS = 64  # a shape-table entry with more dimensions is not a tensor anyone sent
MAX_NUMEL = 2**62  # product of a shape's non-zero dimensions: beyond this torch cannot even describe it


@dataclass(frozen=True)
class ChainSpec:
    """A parsed codec chain."""

    delta: bool = False
    topk: float | None = None
    coding: str = "fp32"
    zstd: bool = False

    @property
    def lossless(self) -> bool:
        return self.topk is None and self.coding == "fp32"

    def __str__(self) -> str:
        parts = ["delta"] if self.delta else []
        parts += [f"topk:{self.topk:g}"] if self.topk is not None else []
        parts += [self.coding] if self.coding != "fp32" else []
        parts += ["zstd"] if self.zstd else []
        return ",".join(parts) or "raw"


def parse_chain(spec: str, where: str = "--codec") -> ChainSpec:
    """Parse a chain; stages must appear in pipeline order, at most once, with one value coding."""
    order, values = ["delta", "topk", "coding", "zstd"], {}
    expected = "expected a comma-separated chain of delta, topk:FRACTION, fp16|bf16|int8|int4, zstd (in that order), or raw / gradualdiff"
    if any(not t.strip() for t in spec.split(",")):  # '' or 'delta,,zstd': a typo, not a request for raw
        raise ConfigError(f"{where} {spec!r}: an empty stage; {expected}")
    spec = PRESETS.get(spec.strip(), spec)
    for token in filter(None, (t.strip() for t in spec.split(","))):
        name, _, arg = token.partition(":")
        stage = "coding" if name in VALUE_CODINGS else name
        if stage not in order or (arg and stage != "topk"):
            raise ConfigError(f"{where} {spec!r}: unknown stage {token!r}; {expected}")
        if stage in values:
            raise ConfigError(f"{where} {spec!r}: {stage if stage != 'coding' else 'value coding'} given twice; {expected}")
        if values and order.index(stage) < max(order.index(s) for s in values):
            raise ConfigError(f"{where} {spec!r}: {token!r} is out of order; {expected}")
        if stage == "topk":
            try:
                fraction = float(arg)
            except ValueError:
                raise ConfigError(f"{where} {spec!r}: topk needs a fraction, e.g. topk:0.01") from None
            if not 0 < fraction <= 1:
                raise ConfigError(f"{where} {spec!r}: topk fraction must be in (0, 1], got {fraction}")
            values[stage] = fraction
        else:
            values[stage] = name
    if "topk" in values and "delta" not in values:
        raise ConfigError(f"{where} {spec!r}: topk needs delta before it (sparsifying the weights themselves would "
                          f"zero most of the model)")
    return ChainSpec(delta="delta" in values, topk=values.get("topk"), coding=values.get("coding", "fp32"),
                     zstd="zstd" in values)


class CodecChain:
    """Encodes and decodes named fp32 tensors along one link with the chain's stages."""

    def __init__(self, spec: str | ChainSpec, max_decoded_bytes: int = MAX_DECOMPRESSED) -> None:
        self.spec = spec if isinstance(spec, ChainSpec) else parse_chain(spec)
        self.name = str(self.spec)
        # Largest safetensors blob decode accepts (after zstd): bounds what a small compressed payload
        # can make the receiver allocate. A server sets it from the state it expects.
        self.max_decoded_bytes = max_decoded_bytes

    @property
    def lossless(self) -> bool:
        """The receiver gets exactly the sender's tensors (no topk, no quantization)."""
        return self.spec.lossless

    @property
    def stateless(self) -> bool:
        """The same state encodes to the same bytes on every link (no reference, no residual)."""
        return not self.spec.delta and self.spec.topk is None

    @property
    def delta(self) -> bool:
        """Sends differences against a reference both ends of a link keep."""
        return self.spec.delta

    def limit_decoded(self, max_bytes: int) -> None:
        """Bound what ``decode`` may expand a payload to (a zstd frame may claim any size)."""
        self.max_decoded_bytes = max_bytes

    def encode(self, state: State, link: Link | None = None) -> bytes:
        """Bytes for ``state``; updates the sender's residual (topk) and reference (delta) on ``link``."""
        link = link or Link()
        base = link.reference if self.spec.delta else None
        update = {k: self._difference(v.detach().float(), base[k] if base is not None else None)
                  for k, v in state.items()}
        feedback = self.spec.topk is not None and link.error_feedback
        if feedback:
            update = {k: v + link.residual.get(k, 0) for k, v in update.items()}
        sparse = self._sparse(base)
        tensors, shapes = {}, {}
        for name, value in update.items():
            shapes[name] = list(value.shape)
            flat = value.flatten()
            if sparse:
                k = min(flat.numel(), max(1, math.ceil(self.spec.topk * flat.numel())))  # an empty tensor: none
                indices = flat.abs().topk(k).indices.sort().values
                tensors[f"{name}::indices"] = indices.to(torch.int32)
                flat = flat[indices]
            parts = {"values": flat.contiguous()} if self.exact_delta else quantize(flat, self.spec.coding)
            for part, tensor in parts.items():
                tensors[f"{name}::{part}"] = tensor
        # One metadata key, its names sorted: safetensors writes its metadata map in hash order, and a state's
        # tensor order differs after a resume, so the same state used to encode to other bytes (and sizes).
        payload = st_save(tensors, metadata={"shapes": json.dumps(shapes, sort_keys=True)})
        if self.spec.delta:  # (topk implies delta) the sender needs what the receiver will rebuild
            # Lossless: the receiver rebuilds exactly ``update``; no need to parse our own payload back.
            delivered = update if self.spec.lossless else self._reconstruct(st_load(payload), shapes, sparse)
            if feedback:
                link.residual = {k: update[k] - delivered[k] for k in update}
            if self.spec.delta:
                link.reference = {k: self._apply(base[k] if base is not None else None, delivered[k]) for k in update}
        return zstandard.ZstdCompressor(level=3).compress(payload) if self.spec.zstd else payload

    def decode(self, payload: bytes, link: Link | None = None) -> State:
        """The state the sender encoded (lossy stages aside); updates the receiver's reference (delta)."""
        link = link or Link()
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
        raw = self._decompress(bytes(payload)) if self.spec.zstd else bytes(payload)
        if len(raw) > self.max_decoded_bytes:
            raise PayloadError(f"payload of {len(raw)} bytes exceeds the decode limit of "
                               f"{self.max_decoded_bytes} bytes")
        tensors = load_safetensors(raw, f"{self.name} payload")
        shapes = _shape_table(raw, self.name)
        if self.spec.delta and link.reference is not None:
            self._check_against(shapes, link.reference)
        # what the shape table makes us allocate (fp32, dense), bounded like the payload itself: int4 values with
        # their scales are 8x smaller than the tensors they decode to, and zstd shrinks them further (a 1.4 kB
        # int4,zstd payload once claimed a 228 MB tensor)
        dense = 4 * sum(math.prod(shape) for shape in shapes.values())
        if dense > self.max_decoded_bytes:
            raise PayloadError(f"payload's shape table asks for {dense} bytes of tensors, over the decode limit of "
                               f"{self.max_decoded_bytes} bytes")
        delivered = self._reconstruct(tensors, shapes, self._sparse(link.reference))
        if not self.spec.delta:
            return delivered
        state = {k: self._apply(link.reference[k] if link.reference else None, v) for k, v in delivered.items()}
        link.reference = {k: v.clone() for k, v in state.items()}  # the caller may modify what it gets
        return state

    @staticmethod
    def _check_against(shapes: dict[str, list[int]], reference: State) -> None:
        """A difference must have the reference's tensor names and shapes."""
        if not isinstance(shapes, dict) or shapes.keys() != reference.keys():
            raise PayloadError(f"delta payload names {sorted(shapes)[:3]} do not match the reference state")
        for name, shape in shapes.items():
            if shape != list(reference[name].shape):
                raise PayloadError(f"{name}: difference of shape {shape}, the reference has {list(reference[name].shape)}")

    def _sparse(self, reference: State | None) -> bool:
        """Top-k applies to differences against a reference; the first message on a link (no reference
        yet: a difference against zero, i.e. the whole state) goes dense, or most weights would arrive as 0."""
        return self.spec.topk is not None and reference is not None

    @property
    def exact_delta(self) -> bool:
        """Lossless chains difference the fp32 bit patterns (XOR): bit-exact, and zstd squeezes the
        leading zero bits that nearby weights share. Lossy chains difference the values."""
        return self.spec.delta and self.spec.lossless

    def _difference(self, value: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if self.exact_delta:
            bits = value.contiguous().view(torch.int32)
            return bits if base is None else bits ^ base.contiguous().view(torch.int32)
        return value if base is None else value - base

    def _apply(self, base: torch.Tensor | None, delivered: torch.Tensor) -> torch.Tensor:
        """``base`` plus the difference, always in fresh memory: a link's reference must not alias the
        sender's state (or another link's reference), which may change or be saved alongside it."""
        if self.exact_delta:
            bits = delivered.clone() if base is None else delivered ^ base.contiguous().view(torch.int32)
            return bits.view(torch.float32)
        return delivered.clone() if base is None else base + delivered

    def _decompress(self, payload: bytes) -> bytes:
        """The zstd frame's content, refusing more than ``max_decoded_bytes``. ``max_output_size`` only
        bounds frames that do not state their size: a frame that does is allocated at the size it
        claims, so that claim is checked first (16 bytes claiming 1 TiB raised MemoryError)."""
        limit = self.max_decoded_bytes
        try:
            claimed = zstandard.frame_content_size(payload)  # -1: not stated
            if claimed > limit:
                raise PayloadError(f"zstd frame claims {claimed} bytes decompressed, over the limit of {limit} bytes")
            # one frame and nothing after it: trailing bytes are as malformed as any other
            return zstandard.ZstdDecompressor().decompress(payload, max_output_size=limit, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise PayloadError(f"payload of {len(payload)} bytes is not a valid zstd frame ({exc})") from None

    def _reconstruct(self, tensors: State, shapes: dict[str, list[int]], sparse: bool) -> State:
        """Dense fp32 tensors from the wire tensors, checking every part's dtype and shape."""
        roles = ["values"] if self.exact_delta else list(expected_parts(self.spec.coding, 0))
        expected_keys = {f"{name}::{role}" for name in shapes for role in roles + (["indices"] if sparse else [])}
        if tensors.keys() != expected_keys:
            extra, missing = sorted(tensors.keys() - expected_keys), sorted(expected_keys - tensors.keys())
            raise PayloadError(f"payload tensors do not match its shape table: unexpected {extra[:3]}, "
                               f"missing {missing[:3]}")
        out = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            count = numel
            if sparse:
                indices = tensors.get(f"{name}::indices")
                count = max(1, math.ceil(self.spec.topk * numel)) if numel else 0
                if indices is None or indices.dtype != torch.int32 or tuple(indices.shape) != (count,) or (
                        count and (indices.min() < 0 or indices.max() >= numel)):
                    raise PayloadError(f"{name}: expected {count} int32 indices in [0, {numel})")
            parts = {}
            expected = {"values": (torch.int32, (count,))} if self.exact_delta else expected_parts(self.spec.coding, count)
            for part, (dtype, part_shape) in expected.items():
                tensor = tensors.get(f"{name}::{part}")
                if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != part_shape:
                    got = None if tensor is None else (tensor.dtype, tuple(tensor.shape))
                    raise PayloadError(f"{name}::{part}: expected {dtype} of shape {part_shape}, got {got}")
                parts[part] = tensor
            values = parts["values"] if self.exact_delta else dequantize(parts, self.spec.coding, count)
            if values.is_floating_point() and not torch.isfinite(values).all():
                raise PayloadError(f"{name}: contains NaN or Inf")
            if sparse:
                dense = torch.zeros(numel)
                dense[indices.long()] = values
                values = dense
            out[name] = values.view(shape)
        return out


def _shape_table(raw: bytes, chain: str) -> dict[str, list[int]]:
    """The ``shapes`` metadata of a payload safetensors already accepted: tensor name to a list of
    non-negative int dimensions, each entry one torch can build."""
    try:
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        shapes = json.loads(header["__metadata__"]["shapes"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: "[[[[..." nested JSON
        reason = f"{type(exc).__name__}: {str(exc)[:80]}"
        raise PayloadError(f"{chain} payload has no valid shape table ({reason})") from None
    if not isinstance(shapes, dict):
        raise PayloadError(f"{chain} payload's shape table is a {type(shapes).__name__}, expected an object")
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)
                and math.prod(max(d, 1) for d in shape) < MAX_NUMEL):
            raise PayloadError(f"{name}: invalid shape {shape!r:.80} in the shape table")
    return shapes
