"""Cut a BERT-family sequence classifier at transformer layer K into a client half and a server half.

Client half: token embeddings and layers ``[0, K)``; server half: layers ``[K, N)``, the pooler and
the classification head — or, U-shaped, the pooler and head stay on the client so labels never leave it. Per batch the client sends the activations at the cut (and the attention
mask, which the server needs for its own layers); the server returns the gradient of the loss with
respect to those activations, and the client back-propagates it through its half.

Both halves call the model's own submodules (no copies of weights), so running the client half and
then the server half is the unsplit model's forward, op for op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from fedcustom.errors import ConfigError


@dataclass
class ServerStep:
    """What the server computes for one batch: the loss, the logits and the gradient at the cut."""

    loss: torch.Tensor  # () scalar, detached
    logits: torch.Tensor  # (batch, labels), detached
    grad_at_cut: torch.Tensor  # (batch, seq, hidden): d loss / d activations, sent back to the client


class SplitEncoder:
    """The two halves of an encoder classifier (``BertForSequenceClassification`` and its relatives)."""

    def __init__(self, model: nn.Module, cut_layer: int, head_on_client: bool = False) -> None:
        self.model = model  # names of parameters are this model's (a PeftModel when the client half has LoRA)
        self.hf = unwrap(model)  # e.g. BertForSequenceClassification
        self.encoder = self.hf.base_model  # e.g. BertModel: embeddings, encoder.layer, pooler
        self.layers = self.encoder.encoder.layer
        self.cut_layer = cut_layer
        self.head_on_client = head_on_client  # U-shaped: pooler and classifier stay with the labels on the client

    def _named(self, modules: list[nn.Module]) -> dict[str, nn.Parameter]:
        owned = {id(p) for m in modules for p in m.parameters()}
        return {name: p for name, p in self.model.named_parameters() if id(p) in owned and p.requires_grad}

    def _head(self) -> list[nn.Module]:
        return [m for m in (self.encoder.pooler, self.hf.classifier) if m is not None]

    def client_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of the embeddings and layers [0, K) (and the head, U-shaped), by name."""
        head = self._head() if self.head_on_client else []
        return self._named([self.encoder.embeddings, *self.layers[: self.cut_layer], *head])

    def server_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of layers [K, N) (and the head, unless U-shaped), by name."""
        head = [] if self.head_on_client else self._head()
        return self._named([*self.layers[self.cut_layer :], *head])

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def client_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings and layers [0, K): the activations at the cut, (batch, seq, hidden)."""
        hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = self._mask(hidden, attention_mask)
        for layer in self.layers[: self.cut_layer]:
            hidden = layer(hidden, mask)
        return hidden

    def middle_forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layers [K, N): the last hidden states, (batch, seq, hidden)."""
        hidden = activations
        mask = self._mask(hidden, attention_mask)
        for layer in self.layers[self.cut_layer :]:
            hidden = layer(hidden, mask)
        return hidden

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pooler and classifier on the last hidden states: the logits, (batch, labels)."""
        pooled = self.encoder.pooler(hidden) if self.encoder.pooler is not None else hidden[:, 0]
        return self.hf.classifier(self.hf.dropout(pooled))

    def server_forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layers [K, N), pooler and head: the logits, (batch, labels)."""
        return self.head_forward(self.middle_forward(activations, attention_mask))

    def server_step(self, activations: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> ServerStep:
        """Forward and backward of the server half on received activations; gradients of the server's own
        trainable weights accumulate in place (the caller steps the server optimizer)."""
        received = activations.detach().requires_grad_(True)  # a leaf: the wire cut the client's graph
        logits = self.server_forward(received, attention_mask)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        return ServerStep(loss=loss.detach(), logits=logits.detach(), grad_at_cut=received.grad)

    def head_step(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U-shaped, on the client: head forward and backward on the server's last hidden states.
        Returns the loss and d loss / d hidden, which goes back to the server; head gradients accumulate."""
        received = hidden.detach().requires_grad_(True)  # (batch, seq, hidden)
        loss = nn.functional.cross_entropy(self.head_forward(received), labels)
        loss.backward()
        return loss.detach(), received.grad


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel (LoRA layers injected in place), else the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def cut_encoder(model: nn.Module, cut_layer: int, head_on_client: bool = False) -> SplitEncoder:
    """Split ``model`` after ``cut_layer`` transformer layers; a clear error for an unsupported model or cut."""
    hf = unwrap(model)
    base = getattr(hf, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(base, "embeddings") or not hasattr(hf, "classifier"):
        raise ConfigError(f"--cut-layer: split learning supports BERT-family sequence classifiers (embeddings, "
                          f"encoder.layer, classifier); got {type(hf).__name__}")
    if not 1 <= cut_layer < len(layers):
        raise ConfigError(f"--cut-layer {cut_layer}: expected 1 to {len(layers) - 1} for a model with "
                          f"{len(layers)} transformer layers (the client and the server each keep at least one)")
    return SplitEncoder(model, cut_layer, head_on_client)
