"""Prefixes and soft prompts that start from real tokens (fedcustom.methods.soft_init)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedcustom.config import MethodConfig
from fedcustom.errors import ConfigError
from fedcustom.methods import get_method
from fedcustom.methods.soft_init import check_init_spec, init_token_ids
from fedcustom.models import load_model

TEXT = "the movie was good and the plot"


def _build(path: str, task: str, method: str, **method_cfg):
    tokenizer = AutoTokenizer.from_pretrained(path)
    labels = ["neg", "pos"]
    backbone = load_model(path, task, labels, tokenizer, seed=0)
    cfg = MethodConfig(name=method, num_virtual_tokens=5, **method_cfg)
    return tokenizer, get_method(method).build(backbone, cfg, task, tokenizer).eval()


def test_a_prefix_from_text_makes_a_decoder_read_that_text_first(tiny_llama: str) -> None:
    # Prepare: a prefix of the keys/values of 5 real tokens, and the same tokens written before the input
    tokenizer, model = _build(tiny_llama, "causal-lm", "prefix", prefix_init=f"text:{TEXT}")
    prefix_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:5]
    inputs = tokenizer(["great actors and a dull story"], return_tensors="pt", add_special_tokens=False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    joined = torch.cat([torch.tensor([prefix_ids]), inputs["input_ids"]], dim=1)
    # Execute
    with torch.no_grad():
        tuned = model(**inputs).logits
        reference = plain(input_ids=joined, attention_mask=torch.ones_like(joined)).logits[:, 5:]
    # Assert: identical next-token predictions on every input position
    assert torch.allclose(tuned, reference, atol=1e-5)


def test_random_prefix_is_not_that_text(tiny_llama: str) -> None:
    tokenizer, model = _build(tiny_llama, "causal-lm", "prefix", prefix_init="random")
    prefix_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:5]
    inputs = tokenizer(["great actors and a dull story"], return_tensors="pt", add_special_tokens=False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    joined = torch.cat([torch.tensor([prefix_ids]), inputs["input_ids"]], dim=1)
    with torch.no_grad():
        gap = (model(**inputs).logits - plain(input_ids=joined).logits[:, 5:]).abs().max()
    assert gap > 1e-2


def test_an_encoder_prefix_holds_the_first_layers_keys_of_the_tokens(tiny_bert: str) -> None:
    # Prepare
    tokenizer, model = _build(tiny_bert, "classification", "prefix", prefix_init=f"text:{TEXT}")
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"][:5]])
    bert = model.get_base_model().bert
    # Execute: layer 0's keys of the tokens, computed from its own projection
    with torch.no_grad():
        keys = bert.encoder.layer[0].attention.self.key(bert.embeddings(input_ids=ids))  # (1, 5, hidden)
    config = model.active_peft_config
    rows = model.prompt_encoder["default"].embedding.weight.view(5, config.num_layers * 2, -1)
    # Assert
    assert torch.allclose(rows[:, 0], keys[0], atol=1e-5)


def test_a_prompt_from_text_holds_the_tokens_embeddings(tiny_bert: str) -> None:
    tokenizer, model = _build(tiny_bert, "classification", "prompt", prompt_init=f"text:{TEXT}")
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"][:5])
    words = model.get_base_model().get_input_embeddings()
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, words(ids))


def test_task_text_names_the_labels_and_vocab_draws_no_special_tokens(tiny_bert: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    backbone = load_model(tiny_bert, "classification", ["bad", "good"], tokenizer, seed=0)
    task = init_token_ids("task", tokenizer, 30, backbone, "classification")
    assert {"bad", "good"} <= set(tokenizer.convert_ids_to_tokens(task.tolist()))
    torch.manual_seed(1)
    drawn = init_token_ids("vocab", tokenizer, 8, backbone, "classification")
    torch.manual_seed(1)
    assert torch.equal(drawn, init_token_ids("vocab", tokenizer, 8, backbone, "classification"))
    assert not set(drawn.tolist()) & set(tokenizer.all_special_ids)


@pytest.mark.parametrize("spec", ["text:", "words", "vocab:5", "random:x"])
def test_bad_init_specs_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="prefix_init"):
        check_init_spec(spec, "method.prefix_init (--prefix-init)")


def test_token_init_with_a_projection_is_refused_but_the_default_falls_back_to_random(tiny_bert: str) -> None:
    with pytest.raises(ConfigError, match="prefix-projection"):
        _build(tiny_bert, "classification", "prefix", prefix_projection=True, prefix_init="vocab")
    _build(tiny_bert, "classification", "prefix", prefix_projection=True)  # default "task": random, no error
