"""Raw codec: named tensors as a safetensors blob, so byte counts are the real encoded size.

safetensors is an 8-byte header length, a JSON header (names, dtypes, shapes, offsets) and the
raw little-endian tensor bytes: framing overhead is the header alone.
"""

from __future__ import annotations

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
