"""How a payload of named tensors becomes bytes on the wire and back: raw safetensors, or a codec
chain (differences, top-k with error feedback, fp16/bf16/int8/int4, zstd)."""

from fedcustom.codecs.chain import CodecChain, parse_chain
from fedcustom.codecs.link import Link, SharedReferences, links_from_state, links_state
from fedcustom.codecs.raw import Codec, RawCodec, get_codec, raw_size

__all__ = ["Codec", "CodecChain", "Link", "RawCodec", "SharedReferences", "get_codec", "links_from_state", "links_state", "parse_chain", "raw_size"]
