"""Batched greedy generation for causal LMs, bare or wrapped by PEFT (LoRA, prompt or prefix tuning).

Used to evaluate generative customization (instruction following, summarisation) and by
`fedcustom generate`. Prompts are left-padded so every row's last real token sits at the end of the
batch, which is where decoder-only models continue from; the decoding is greedy so a run is
reproducible and batching does not change the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.errors import FedCustomError


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], raw: bool = False) -> str:
    """The text a chat model expects for ``messages``, ending where the assistant's answer begins.

    ``raw=True`` skips the template and joins the user messages' content with blank lines, for
    base models without a chat template (the CLI's ``--no-chat-template``); system messages are
    then dropped.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise FedCustomError(f"message {i}: expected a dict with 'role' and 'content', got {message!r}")
    if raw:
        return "\n\n".join(str(m["content"]) for m in messages if m["role"] == "user")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FedCustomError(
            f"model {name!r}: its tokenizer has no chat template, and a chat template is required to format "
            f"chat messages; use a chat/instruct model, or --no-chat-template to send the raw prompt text"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def virtual_tokens(model: nn.Module) -> int:
    """Positions a PEFT prompt/prefix adapter adds before the input (0 for LoRA or a bare model)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return 0
    config = configs.get(getattr(model, "active_adapter", "default"))
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def context_limit(model: nn.Module, max_new_tokens: int) -> int | None:
    """Longest prompt (in tokens) that leaves room for the answer, or None if the model sets no limit."""
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if not max_positions:
        return None
    return int(max_positions) - max_new_tokens - virtual_tokens(model)


def check_lengths(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                  max_new_tokens: int, add_special_tokens: bool = False) -> None:
    """Reject an empty prompt, or one the model cannot continue for ``max_new_tokens`` within its context."""
    limit = context_limit(model, max_new_tokens)
    for i, prompt in enumerate(prompts):
        count = len(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        if count == 0:
            raise FedCustomError(f"prompt {i}: empty (0 tokens); expected some text to continue")
        if limit is not None and count > limit:
            extra = virtual_tokens(model)
            raise FedCustomError(
                f"prompt {i}: {count} tokens, but at most {limit} fit (the model's context of "
                f"{model.config.max_position_embeddings} positions minus max_new_tokens={max_new_tokens}"
                + (f" minus {extra} virtual tokens of the adapter" if extra else "")
                + "); shorten the prompt or lower --max-new-tokens"
            )


@contextmanager
def _generation_mode(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Eval mode, no autograd and left padding for the duration; the caller's settings come back after."""
    was_training, padding_side, pad_token = model.training, tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"
    if pad_token is None:
        if tokenizer.eos_token is None:
            raise FedCustomError(f"model {tokenizer.name_or_path!r}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None


def _injects_soft_prompt(model: nn.Module) -> bool:
    """A PEFT prompt-tuning / P-tuning adapter: virtual token embeddings go before the input's."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "peft_type", None) in ("PROMPT_TUNING", "P_TUNING")


def _generate_with_soft_prompt(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               **kwargs: object) -> torch.Tensor:
    """Soft prompt + input embeddings through the backbone's own generate; returns only the new tokens.

    PEFT's generate drops position_ids for prompt tuning, so a left-padded row's text gets positions
    shifted by its padding and the answer depends on the batch. Here the backbone derives positions
    from the attention mask: virtual tokens 0..V-1, text from V on, pads skipped, as for a lone prompt.
    """
    embeds = model.word_embeddings(input_ids)  # (batch, prompt_len, hidden)
    soft = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)  # (batch, virtual, hidden)
    mask = torch.cat([torch.ones(soft.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                      attention_mask], dim=1)  # (batch, virtual + prompt_len)
    return model.get_base_model().generate(inputs_embeds=torch.cat([soft, embeds], dim=1), attention_mask=mask,
                                           **kwargs)


def _eos_kwargs(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Stop at the tokenizer's EOS when the model's generation config names none."""
    generation_config = getattr(model, "generation_config", None)
    if getattr(generation_config, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
        return {"eos_token_id": tokenizer.eos_token_id}
    return {}


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
             max_new_tokens: int = 64, batch_size: int = 8, add_special_tokens: bool = False) -> list[str]:
    """Greedy continuations of ``prompts``: only the new text, special tokens skipped, stripped.

    Works for a Hugging Face causal LM and a PEFT model around one. Prompts are tokenized without
    special tokens by default, as fedcustom's causal-LM training tokenizes them (chat templates write
    their own BOS). Raises FedCustomError when a prompt is empty or leaves no room for
    ``max_new_tokens`` in the model's context.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise FedCustomError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: expected both >= 1")
    if not prompts:
        return []
    check_lengths(model, tokenizer, prompts, max_new_tokens, add_special_tokens)
    device = next(model.parameters()).device
    answers: list[str] = []
    with _generation_mode(model, tokenizer):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens)
            input_ids = batch["input_ids"].to(device)  # (batch, prompt_len), left-padded
            attention_mask = batch["attention_mask"].to(device)
            options = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                           pad_token_id=tokenizer.pad_token_id, **_eos_kwargs(model, tokenizer))
            if _injects_soft_prompt(model):
                new_tokens = _generate_with_soft_prompt(model, input_ids, attention_mask, **options)
            else:
                # keyword arguments only: PEFT's prefix-tuning generate hands **kwargs to the backbone
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
                new_tokens = output[:, input_ids.shape[1]:]  # (batch, <= max_new_tokens)
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers
