"""Start soft prompts and prefixes from the pretrained model's own behaviour instead of random vectors.

PEFT initialises prefix key/values and prompt embeddings N(0, 1): far from anything the backbone has
seen, which breaks a pretrained causal LM before training (held-out perplexity of SmolLM2 27.8 ->
1,810) and costs an encoder many rounds. Li & Liang (2021, "Prefix-Tuning", section 7.2) initialise
prefixes with the activations of real words, and Lester et al. (2021) prompts with real token
embeddings. Here both start from real tokens:

- ``text:TEXT``: the tokens of TEXT, repeated or cut to the prefix length;
- ``vocab``: tokens drawn (seeded, without special tokens) from the tokenizer's vocabulary;
- ``task``: a sentence describing the task (classification: its label names);
- ``random``: PEFT's N(0, 1) initialisation.

A prefix initialised from tokens holds exactly the keys and values the backbone computes for them, so the
prefix-tuned model starts as the backbone reading those tokens first (tested to 1e-5 on a decoder); a
prompt starts as their input embeddings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from fedcustom.errors import ConfigError

INIT_FORMS = ("task", "vocab", "random", "text:TEXT")


def check_init_spec(spec: str, where: str) -> None:
    """A clear error unless ``spec`` is one of :data:`INIT_FORMS`."""
    kind, sep, text = spec.partition(":")
    if (kind in ("task", "vocab", "random") and not sep) or (kind == "text" and text.strip()):
        return
    raise ConfigError(f"{where}: {spec!r} is not one of {', '.join(INIT_FORMS)} (text: needs some text)")


def task_text(backbone: nn.Module, task: str) -> str:
    """A plain sentence that names the task: the label names of a classifier, or an instruction to answer."""
    from fedcustom.tasks import get_task

    return get_task(task).task_text(backbone)


def init_token_ids(spec: str, tokenizer: PreTrainedTokenizerBase, count: int, backbone: nn.Module,
                   task: str) -> torch.Tensor | None:
    """``count`` token ids for an initialisation spec (None: random); ``vocab`` draws from torch's generator,
    which the model loader has just seeded."""
    kind, _, text = spec.partition(":")
    if kind == "random":
        return None
    if kind == "vocab":
        special = set(tokenizer.all_special_ids)
        size = min(len(tokenizer), backbone.get_input_embeddings().num_embeddings)
        candidates = torch.tensor([i for i in range(size) if i not in special])
        return candidates[torch.randperm(len(candidates))[:count]].repeat(count)[:count]
    if kind == "task":
        text = task_text(backbone, task)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"initialisation text {text!r} has no tokens for this tokenizer")
    return torch.tensor(ids).repeat(count // len(ids) + 1)[:count]  # repeated to the length, as PEFT's TEXT init


@torch.no_grad()
def token_key_values(backbone: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values ``backbone`` computes for ``ids`` read alone: each (kv_heads, P, head_dim).

    An empty cache passed in is filled by every attention layer, encoders included (BERT's self-attention
    updates a cache it is given), so one forward pass serves every architecture PEFT prefix-tunes."""
    cache = DynamicCache()
    was_training = backbone.training
    backbone.eval()
    backbone(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], past_key_values=cache, use_cache=True)
    backbone.train(was_training)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def initialise_prefix(model: nn.Module, ids: torch.Tensor) -> None:
    """Set a PEFT prefix-tuning model's raw prefix embedding to the backbone's key/values of ``ids``."""
    config = model.active_peft_config
    if config.prefix_projection:
        raise ConfigError("--prefix-init from tokens needs raw prefixes; with --prefix-projection use --prefix-init "
                          "random (the MLP's output cannot be set to given key/values)")
    layers = token_key_values(model.get_base_model(), ids)
    if len(layers) != config.num_layers:
        raise ConfigError(f"the backbone filled {len(layers)} attention layers, its prefix has {config.num_layers}")
    # (layers, 2, kv_heads, P, head_dim) -> (P, layers * 2 * kv_heads * head_dim), PEFT's layout of a prefix row
    stacked = torch.stack([torch.stack(kv) for kv in layers])
    rows = stacked.permute(3, 0, 1, 2, 4).reshape(len(ids), -1)
    embedding = model.prompt_encoder[model.active_adapter].embedding
    with torch.no_grad():
        embedding.weight.copy_(rows)


def initialise_prompt(model: nn.Module, ids: torch.Tensor) -> None:
    """Set a PEFT prompt-tuning model's virtual token embeddings to the backbone's embeddings of ``ids``."""
    words = model.get_base_model().get_input_embeddings()
    embedding = model.prompt_encoder[model.active_adapter].embedding
    with torch.no_grad():
        embedding.weight.copy_(words(ids).to(embedding.weight.dtype))
