"""Raw codec: named tensors as a safetensors blob, so byte counts are the real encoded size.

safetensors is an 8-byte header length, a JSON header (names, dtypes, shapes, offsets) and the
raw little-endian tensor bytes: framing overhead is the header alone.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcustom.errors import PayloadError


class Codec(Protocol):
    """Turns ``{name: tensor}`` into bytes and back; ``decode`` raises PayloadError on bad bytes. It declares what
    the server and clients must know to keep its links (``link``: a :class:`~fedcustom.codecs.link.Link`)."""

    name: str
    lossless: bool  # the receiver gets exactly the sender's tensors
    stateless: bool  # the same state encodes to the same bytes on every link (no reference, no residual)
    delta: bool  # sends differences against a reference both ends of a link keep

    def limit_decoded(self, max_bytes: int) -> None:
        """Bound what ``decode`` may expand a payload to."""
        ...

    def encode(self, state: dict[str, torch.Tensor], link: Any = None) -> bytes: ...

    def decode(self, payload: bytes, link: Any = None) -> dict[str, torch.Tensor]: ...


class RawCodec:
    """Tensors as they are (fp32 for trained tensors), in safetensors format."""

    name = "raw"
    lossless, stateless, delta = True, True, False

    def limit_decoded(self, max_bytes: int) -> None:
        """Nothing to bound: raw decoding never produces more than the payload itself."""

    def encode(self, state: dict[str, torch.Tensor], link: Any = None) -> bytes:
        return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})

    def decode(self, payload: bytes, link: Any = None) -> dict[str, torch.Tensor]:
        return load_safetensors(payload, "safetensors blob")


# safetensors' dtype names (its JSON header) for the torch dtypes a model state holds, in the library's dtype
# order (its Rust enum: BOOL, U8, I8, I16, F16, BF16, I32, F32, F64, I64), which orders a blob's tensors.
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}


def raw_size(state: dict[str, torch.Tensor]) -> int:
    """``len(RawCodec().encode(state))`` without building the blob: counting what a message would carry by
    encoding it holds a second full copy of the model (a whole model for full fine-tuning). The header is
    safetensors' own layout (tests check it against the library byte for byte): tensors ordered by dtype, the
    library's last first, then by name; compact JSON; padded with spaces to a multiple of 8 after an 8-byte
    length."""
    if any(tensor.dtype not in _DTYPE_RANK for tensor in state.values()):  # a dtype not tabled: the library's count
        return len(RawCodec().encode(state))
    entries, offset = [], 0
    for name, tensor in sorted(state.items(), key=lambda item: (-_DTYPE_RANK[item[1].dtype], item[0])):
        size = tensor.numel() * tensor.element_size()
        shape = json.dumps(list(tensor.shape), separators=(",", ":"))
        entries.append(f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{_SAFETENSORS_DTYPES[tensor.dtype]}",'
                       f'"shape":{shape},"data_offsets":[{offset},{offset + size}]}}')
        offset += size
    header = len(("{" + ",".join(entries) + "}").encode())
    return 8 + header + (-header % 8) + offset


def load_safetensors(payload: bytes, what: str) -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors blob; PayloadError (naming ``what``) for anything else.

    safetensors checks the header (JSON, offsets inside the buffer, sizes matching dtype x shape)
    before any tensor is built, so a lying header cannot make it allocate more than the payload;
    a dtype torch has no equivalent for surfaces as a KeyError from the torch adapter."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    try:
        return st_load(bytes(payload))
    except (SafetensorError, ValueError, OverflowError, KeyError, TypeError, RuntimeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise PayloadError(f"payload of {len(payload)} bytes is not a valid {what} ({reason})") from None


def get_codec(name: str, where: str = "--codec", max_decoded_bytes: int | None = None) -> Codec:
    """``raw`` (this module), else a codec chain such as ``delta,topk:0.01,int8,zstd`` (codecs/chain.py).

    ``max_decoded_bytes`` bounds what a chain's decode may decompress (default: chain.MAX_DECOMPRESSED);
    raw decoding never produces more than the payload itself, so it needs none."""
    if name == "raw":
        return RawCodec()
    from fedcustom.codecs.chain import MAX_DECOMPRESSED, CodecChain, parse_chain

    return CodecChain(parse_chain(name, where), max_decoded_bytes or MAX_DECOMPRESSED)
