"""How a payload of named tensors becomes bytes on the wire and back: raw safetensors, or a codec
chain (differences, top-k with error feedback, fp16/bf16/int8/int4, zstd)."""

from fedcustom.codecs.chain import CodecChain, Link, is_lossless, is_stateless, parse_chain, uses_delta
from fedcustom.codecs.raw import Codec, RawCodec, get_codec

__all__ = ["Codec", "CodecChain", "Link", "RawCodec", "get_codec", "is_lossless", "is_stateless", "parse_chain", "uses_delta"]
