"""Cut a model at transformer layer K into a client half and a server half.

Encoders (BERT family) and decoder-only models with a classification head (LLaMA family) are cut
for classification; decoder-only causal LMs (LLaMA family, e.g. SmolLM2) for generative training,
with the next-token loss on the labelled (response) positions. Client half: token embeddings and
layers ``[0, K)``; server half: layers ``[K, N)`` and the head — or, U-shaped, the head stays on
the client so labels never leave it. Per batch the
client sends the activations at the cut (and the attention mask, which the server needs for its own
layers); the server returns the gradient of the loss with respect to those activations, and the
client back-propagates it through its half.

Both halves call the model's own submodules (no copies of weights), so running the client half and
then the server half is the unsplit model's forward, op for op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from fedcustom.data.features import IGNORE_INDEX
from fedcustom.errors import ConfigError


@dataclass
class ServerStep:
    """What the server computes for one batch: the loss, the logits and the gradient at the cut."""

    loss: torch.Tensor  # () scalar, detached
    logits: torch.Tensor  # (batch, labels) or, causal LM, (batch, seq, vocab); detached
    grad_at_cut: torch.Tensor  # (batch, seq, hidden): d loss / d activations, sent back to the client


class SplitModel:
    """The two halves of a sequence classifier; subclasses say which modules are where and how each runs."""

    def __init__(self, model: nn.Module, cut_layer: int, head_on_client: bool = False) -> None:
        self.model = model  # names of parameters are this model's (a PeftModel or SplitPrefixModel, if adapted)
        self.hf = unwrap(model)  # e.g. BertForSequenceClassification
        self.prefix = getattr(model, "client_prefix", None)  # prefixes on layers [0, K), or None (methods/split/prefix)
        self.cut_layer = cut_layer
        self.head_on_client = head_on_client  # U-shaped: the head stays with the labels on the client

    # What a subclass provides -------------------------------------------------------------------
    layers: nn.ModuleList

    def _embedding_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _head_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def client_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings and layers [0, K): the activations at the cut, (batch, seq, hidden)."""
        raise NotImplementedError

    def middle_forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layers [K, N): the last hidden states, (batch, seq, hidden)."""
        raise NotImplementedError

    def head_forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The classification head on the last hidden states: the logits, (batch, labels)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of the head's logits (classification: cross-entropy over the labels)."""
        return nn.functional.cross_entropy(logits, labels)

    # Shared -------------------------------------------------------------------------------------
    def _named(self, modules: list[nn.Module]) -> dict[str, nn.Parameter]:
        owned = {id(p) for m in modules for p in m.parameters()}
        return {name: p for name, p in self.model.named_parameters() if id(p) in owned and p.requires_grad}

    def client_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of the embeddings and layers [0, K) (and the head, U-shaped), by name."""
        head = self._head_modules() if self.head_on_client else []
        prefix = [self.prefix] if self.prefix is not None else []
        return self._named([*prefix, *self._embedding_modules(), *self.layers[: self.cut_layer], *head])

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The head's tensors (pooler and classifier, or final norm and LM head), by name, wherever it runs."""
        return self._named(self._head_modules())

    def server_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of layers [K, N) (and the head, unless U-shaped), by name."""
        head = [] if self.head_on_client else self._head_modules()
        return self._named([*self.layers[self.cut_layer :], *head])

    def server_forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Layers [K, N) and the head: the logits, (batch, labels)."""
        return self.head_forward(self.middle_forward(activations, attention_mask), attention_mask)

    def server_step(self, activations: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> ServerStep:
        """Forward and backward of the server half on received activations; gradients of the server's own
        trainable weights accumulate in place (the caller steps the server optimizer)."""
        received = activations.detach().requires_grad_(True)  # a leaf: the wire cut the client's graph
        logits = self.server_forward(received, attention_mask)
        loss = self.loss(logits, labels)
        loss.backward()
        return ServerStep(loss=loss.detach(), logits=logits.detach(), grad_at_cut=received.grad)

    def head_step(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U-shaped, on the client: head forward and backward on the server's last hidden states.
        Returns the loss and d loss / d hidden, which goes back to the server; head gradients accumulate."""
        received = hidden.detach().requires_grad_(True)  # (batch, seq, hidden)
        loss = self.loss(self.head_forward(received, attention_mask), labels)
        loss.backward()
        return loss.detach(), received.grad


class SplitEncoder(SplitModel):
    """An encoder classifier (``BertForSequenceClassification`` and its relatives): pooler + classifier head."""

    def __init__(self, model: nn.Module, cut_layer: int, head_on_client: bool = False) -> None:
        super().__init__(model, cut_layer, head_on_client)
        self.encoder = self.hf.base_model  # e.g. BertModel: embeddings, encoder.layer, pooler
        self.layers = self.encoder.encoder.layer

    def _embedding_modules(self) -> list[nn.Module]:
        return [self.encoder.embeddings]

    def _head_modules(self) -> list[nn.Module]:
        return [m for m in (self.encoder.pooler, self.hf.classifier) if m is not None]

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def client_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.prefix is None:
            hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            cache, mask = None, self._mask(hidden, attention_mask)
        else:  # as with PEFT's prefixes on the whole model, positions start after the prefix
            hidden = self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                             past_key_values_length=self.prefix.virtual_tokens)
            cache, mask = self.prefix.cache(len(hidden)), self._mask(hidden, self.prefix.widen(attention_mask))
        for layer in self.layers[: self.cut_layer]:
            hidden = layer(hidden, mask, past_key_values=cache)
        return hidden

    def middle_forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = activations
        mask = self._mask(hidden, attention_mask)
        for layer in self.layers[self.cut_layer :]:
            hidden = layer(hidden, mask)
        return hidden

    def head_forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder.pooler(hidden) if self.encoder.pooler is not None else hidden[:, 0]
        return self.hf.classifier(self.hf.dropout(pooled))


class SplitDecoder(SplitModel):
    """A decoder-only classifier (``LlamaForSequenceClassification`` and the other generic ones): causal
    layers with rotary positions, a final norm, and a ``score`` head read at the last real token."""

    def __init__(self, model: nn.Module, cut_layer: int, head_on_client: bool = False) -> None:
        super().__init__(model, cut_layer, head_on_client)
        self.decoder = getattr(self.hf, self.hf.base_model_prefix)  # e.g. LlamaModel
        self.layers = self.decoder.layers

    def _embedding_modules(self) -> list[nn.Module]:
        return [self.decoder.embed_tokens]

    def _head_modules(self) -> list[nn.Module]:
        return [self.decoder.norm, self.hf.score]

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: nn.ModuleList,
             cache: DynamicCache | None = None) -> torch.Tensor:
        """``layers`` on ``hidden`` with the causal mask and rotary embeddings the whole model would use; with a
        prefix ``cache`` (and ``attention_mask`` widened to cover it), positions start after the prefix, as in PEFT."""
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(past, past + hidden.shape[1]).unsqueeze(0)  # (1, seq)
        mask = create_causal_mask(config=self.decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids)
        rotary = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                           past_key_values=cache)
        return hidden

    def client_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(input_ids)
        if self.prefix is None:
            return self._run(hidden, attention_mask, self.layers[: self.cut_layer])
        return self._run(hidden, self.prefix.widen(attention_mask), self.layers[: self.cut_layer],
                         self.prefix.cache(len(hidden)))

    def middle_forward(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(activations, attention_mask, self.layers[self.cut_layer :])

    def head_forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final norm and score at each row's last real token (the attention mask stands in for the pad-id
        test the unsplit model makes on input ids, which the server never sees)."""
        logits = self.hf.score(self.decoder.norm(hidden))  # (batch, seq, labels)
        positions = torch.arange(attention_mask.shape[1])
        last = (positions * attention_mask).argmax(-1)  # (batch,)
        return logits[torch.arange(len(logits)), last]


class SplitCausalLM(SplitDecoder):
    """A decoder-only causal LM (``LlamaForCausalLM`` and relatives): final norm and LM head on every position,
    the next-token loss where labels are not -100 (the response tokens), as the unsplit model computes it."""

    def _head_modules(self) -> list[nn.Module]:
        return [self.decoder.norm, self.hf.lm_head]

    def head_forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self.decoder.norm(hidden))  # (batch, seq, vocab)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token t predicts token t+1: the mean cross-entropy over labelled next tokens (Hugging Face's
        ForCausalLMLoss without num_items_in_batch)."""
        vocab = logits.shape[-1]
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PeftModel (LoRA layers injected in place) or a SplitPrefixModel, else the
    model itself."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    return getattr(model, "split_backbone", model)


def cut_model(model: nn.Module, cut_layer: int, head_on_client: bool = False) -> SplitModel:
    """Split ``model`` after ``cut_layer`` transformer layers; a clear error for an unsupported model or cut."""
    hf = unwrap(model)
    base = getattr(hf, "base_model", None)
    # the head SplitEncoder.head_forward runs: pooler (or none), dropout, classifier on the pooled vector (RoBERTa's
    # classifier takes the whole sequence and has no dropout beside it; ELECTRA has no pooler)
    bert_layout = hasattr(base, "pooler") and hasattr(hf, "dropout") and hasattr(hf, "classifier")
    if isinstance(getattr(getattr(base, "encoder", None), "layer", None), nn.ModuleList) and bert_layout:
        kind, layers = SplitEncoder, base.encoder.layer
    elif isinstance(getattr(base, "layers", None), nn.ModuleList) and hasattr(hf, "score") and hasattr(base, "rotary_emb"):
        kind, layers = SplitDecoder, base.layers
    elif isinstance(getattr(base, "layers", None), nn.ModuleList) and hasattr(hf, "lm_head") and hasattr(base, "rotary_emb"):
        kind, layers = SplitCausalLM, base.layers
        if hf.lm_head.weight is base.embed_tokens.weight and not head_on_client:
            raise ConfigError(f"--split-head server: {type(hf).__name__} ties its LM head to its input embeddings, "
                              f"which the client half holds; keep the head with them: --split-head client")
    else:
        raise ConfigError(f"--cut-layer: split learning supports encoder classifiers laid out as BERT's "
                          f"(encoder.layer, pooler, dropout and a linear classifier: BERT, MiniLM), decoder "
                          f"classifiers (layers, score) and decoder causal LMs (layers, lm_head) with rotary "
                          f"positions, e.g. LLaMA; got {type(hf).__name__}")
    if not 1 <= cut_layer < len(layers):
        raise ConfigError(f"--cut-layer {cut_layer}: expected 1 to {len(layers) - 1} for a model with "
                          f"{len(layers)} transformer layers (the client and the server each keep at least one)")
    return kind(model, cut_layer, head_on_client)
