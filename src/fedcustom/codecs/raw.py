"""Raw codec: named tensors as a safetensors blob, so byte counts are the real encoded size.

safetensors is an 8-byte header length, a JSON header (names, dtypes, shapes, offsets) and the
raw little-endian tensor bytes: framing overhead is the header alone.
"""

from __future__ import annotations

from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcustom.errors import FedCustomError, PayloadError


class Codec(Protocol):
    """Turns ``{name: tensor}`` into bytes and back; ``decode`` raises PayloadError on bad bytes."""

    name: str

    def encode(self, state: dict[str, torch.Tensor]) -> bytes: ...

    def decode(self, payload: bytes) -> dict[str, torch.Tensor]: ...


class RawCodec:
    """Tensors as they are (fp32 for trained tensors), in safetensors format."""

    name = "raw"

    def encode(self, state: dict[str, torch.Tensor]) -> bytes:
        return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})

    def decode(self, payload: bytes) -> dict[str, torch.Tensor]:
        if not isinstance(payload, (bytes, bytearray)):
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
        try:
            return st_load(bytes(payload))
        except (SafetensorError, ValueError, OverflowError) as exc:
            raise PayloadError(f"payload of {len(payload)} bytes is not a valid safetensors blob ({exc})") from None


CODECS = {"raw": RawCodec}


def get_codec(name: str) -> Codec:
    """A codec by name."""
    if name not in CODECS:
        raise FedCustomError(f"codec {name!r}: expected one of {', '.join(CODECS)}")
    return CODECS[name]()
