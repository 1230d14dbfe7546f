"""How a payload of named tensors becomes bytes on the wire and back."""

from fedcustom.codecs.raw import Codec, RawCodec, get_codec

__all__ = ["Codec", "RawCodec", "get_codec"]
