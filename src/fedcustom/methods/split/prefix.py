"""Prefix tuning on the client half of a split model (``--split-client prefix``).

The client's layers ``[0, K)`` each get trainable key/value prefixes, injected the way PEFT's prefix
tuning injects them into a whole model: as a cache that already holds ``P`` virtual tokens, with the
attention mask widened by ``P`` ones (and, in a decoder, token positions starting at ``P``). The
server's layers have no prefixes. PEFT cannot hold prefixes for only some layers of a model (its
cache covers every layer), so the prefixes are a small module of their own here, and the model that
carries them runs its forward through the split: client half, then server half.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, DynamicCache
from transformers.modeling_outputs import SequenceClassifierOutput

from fedcustom.methods.split.cut import cut_model

PREFIX_FILE, PREFIX_CONFIG = "client_prefix.safetensors", "client_prefix.json"


class ClientPrefix(nn.Module):
    """Raw key/value prefixes for ``layers`` layers: one parameter of shape (layers, 2, kv_heads, P, head_dim),
    initialised N(0, 1) like PEFT's prefix embedding."""

    def __init__(self, layers: int, kv_heads: int, virtual_tokens: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(layers, 2, kv_heads, virtual_tokens, head_dim))

    @property
    def virtual_tokens(self) -> int:
        return self.weight.shape[3]

    def cache(self, batch_size: int) -> DynamicCache:
        """A cache whose layer ``i`` already holds prefix ``i`` for every row; each layer appends its own keys."""
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self.weight):  # each (kv_heads, P, head_dim)
            cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), layer)
        return cache

    def widen(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, seq) mask -> (batch, P + seq): every row attends to every prefix position."""
        ones = attention_mask.new_ones(len(attention_mask), self.virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)


def prefix_for(backbone: nn.Module, cut_layer: int, virtual_tokens: int) -> ClientPrefix:
    """Prefixes sized for ``backbone``'s attention (key/value heads, head size) on layers ``[0, cut_layer)``."""
    config = backbone.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ClientPrefix(cut_layer, kv_heads, virtual_tokens, head_dim)


class SplitPrefixModel(nn.Module):
    """A sequence classifier whose first ``cut_layer`` layers carry trainable prefixes.

    Called like the Hugging Face model it wraps (``input_ids``, ``attention_mask``, optional
    ``token_type_ids`` and ``labels``); returns logits and, with labels, the cross-entropy loss.
    """

    def __init__(self, backbone: nn.Module, cut_layer: int, prefix: ClientPrefix) -> None:
        super().__init__()
        self.split_backbone = backbone  # the attribute names cut.unwrap looks for
        self.client_prefix = prefix
        self.cut_layer = cut_layer

    @property
    def config(self):  # noqa: ANN201 - the backbone's PretrainedConfig
        return self.split_backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        split = cut_model(self, self.cut_layer)
        logits = split.server_forward(split.client_forward(input_ids, attention_mask, token_type_ids), attention_mask)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, out_dir: Path) -> None:
        """The backbone as a Hugging Face folder, plus the prefixes and their cut layer beside it."""
        out_dir = Path(out_dir)
        self.split_backbone.save_pretrained(out_dir)
        save_file({"weight": self.client_prefix.weight.detach().contiguous()}, str(out_dir / PREFIX_FILE))
        (out_dir / PREFIX_CONFIG).write_text(json.dumps({"cut_layer": self.cut_layer}) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SplitPrefixModel:
        """Load what :meth:`save_pretrained` wrote."""
        path = Path(path)
        backbone = AutoModelForSequenceClassification.from_pretrained(path)
        weight = load_file(str(path / PREFIX_FILE))["weight"]
        cut_layer = json.loads((path / PREFIX_CONFIG).read_text())["cut_layer"]
        prefix = ClientPrefix(*weight.shape[:1], *weight.shape[2:])
        prefix.weight.data.copy_(weight)
        return cls(backbone, cut_layer, prefix)
