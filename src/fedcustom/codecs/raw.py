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
    """Turns ``{name: tensor}`` into bytes and back; ``decode`` raises PayloadError on bad bytes."""

    name: str

    def encode(self, state: dict[str, torch.Tensor], link: Any = None) -> bytes: ...

    def decode(self, payload: bytes, link: Any = None) -> dict[str, torch.Tensor]: ...


class RawCodec:
    """Tensors as they are (fp32 for trained tensors), in safetensors format."""

    name = "raw"

    def encode(self, state: dict[str, torch.Tensor], link: Any = None) -> bytes:
        return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})

    def decode(self, payload: bytes, link: Any = None) -> dict[str, torch.Tensor]:
        if not isinstance(payload, (bytes, bytearray)):
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
        try:
            return st_load(bytes(payload))
        except (SafetensorError, ValueError, OverflowError) as exc:
            raise PayloadError(f"payload of {len(payload)} bytes is not a valid safetensors blob ({exc})") from None


def get_codec(name: str, where: str = "--codec") -> Codec:
    """``raw`` (this module), else a codec chain such as ``delta,topk:0.01,int8,zstd`` (codecs/chain.py)."""
    if name == "raw":
        return RawCodec()
    from fedcustom.codecs.chain import CodecChain, parse_chain

    return CodecChain(parse_chain(name, where))
