"""Split-FedLLM's cut: the two halves compose to the unsplit model, and the gradient the server
returns is autograd's gradient at the cut of the whole model."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
)

from fedcustom.errors import ConfigError
from fedcustom.methods.split import cut_model

SENTENCES = ["the movie was good", "awful plot and very dull actors it was", "lovely"]  # unequal lengths: padding


def _model_and_batch(path: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()  # eval: no dropout
    batch = dict(AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt"))
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        batch.pop("token_type_ids")  # decoders take no segment ids
    return model, batch


BACKBONES = ["tiny_bert", "tiny_llama"]  # an encoder and a decoder-only causal LM with a classification head


@pytest.mark.parametrize("backbone", BACKBONES)
def test_split_forward_equals_unsplit_forward(backbone: str, request: pytest.FixtureRequest) -> None:
    # Prepare
    model, batch = _model_and_batch(request.getfixturevalue(backbone))
    split = cut_model(model, cut_layer=1)
    # Execute
    with torch.no_grad():
        whole = model(**batch).logits
        halves = split.server_forward(split.client_forward(**batch), batch["attention_mask"])
    # Assert
    assert torch.allclose(halves, whole, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_server_gradient_at_cut_equals_autograd_of_whole_model(backbone: str, request: pytest.FixtureRequest) -> None:
    # Prepare: the whole model's gradient at the output of layer K-1, and its embedding gradient
    model, batch = _model_and_batch(request.getfixturevalue(backbone))
    split = cut_model(model, cut_layer=1)
    embedding = split._embedding_modules()[0]
    embedding = getattr(embedding, "word_embeddings", embedding)  # BERT: the token table inside embeddings
    labels = torch.tensor([1, 0, 1])
    captured = {}
    hook = split.layers[0].register_forward_hook(
        lambda _m, _i, out: captured.setdefault("cut", out[0] if isinstance(out, tuple) else out).retain_grad())
    torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    hook.remove()
    whole_cut_grad = captured["cut"].grad.clone()
    whole_embedding_grad = embedding.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    # Execute: client forward, server step on the "received" activations, client backward
    activations = split.client_forward(**batch)
    step = split.server_step(activations, batch["attention_mask"], labels)
    activations.backward(step.grad_at_cut)
    # Assert
    assert step.grad_at_cut.shape == activations.shape
    assert torch.allclose(step.grad_at_cut, whole_cut_grad, atol=1e-6)
    assert torch.allclose(embedding.weight.grad, whole_embedding_grad, atol=1e-6)


@pytest.mark.parametrize("cut", [0, 2, -1])
def test_cut_outside_the_model_is_a_clear_error(tiny_bert: str, cut: int) -> None:
    model, _ = _model_and_batch(tiny_bert)
    with pytest.raises(ConfigError, match=rf"--cut-layer {cut}: expected 1 to 1 for a model with 2 transformer layers"):
        cut_model(model, cut)


def test_unsupported_architecture_is_a_clear_error() -> None:
    config = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2)
    with pytest.raises(ConfigError, match="encoder classifiers laid out as BERT's.*GPT2LMHeadModel"):
        cut_model(GPT2LMHeadModel(config), 1)


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_encoders_with_another_head_layout_are_refused_not_crashed(family: str) -> None:
    # RoBERTa's classifier reads the whole sequence and has no dropout beside it; ELECTRA has no pooler: both passed
    # the check once and failed mid-run with an AttributeError
    from transformers import (ElectraConfig, ElectraForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    kinds = {"roberta": (RobertaConfig, RobertaForSequenceClassification),
             "electra": (ElectraConfig, ElectraForSequenceClassification)}
    config, model = kinds[family]
    tiny = model(config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40))
    with pytest.raises(ConfigError, match=f"laid out as BERT's.*{model.__name__}"):
        cut_model(tiny, 1)


def _causal_lm(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("head_on_client", [False, True], ids=["head-on-server", "u-shaped"])
def test_a_causal_lm_split_computes_the_unsplit_next_token_loss_and_gradients(head_on_client: bool) -> None:
    # Prepare: two rows, the second padded; labels only on the "response" (-100 on prompt and padding)
    model = _causal_lm()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    whole = model(input_ids=ids, attention_mask=mask, labels=labels)
    whole.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    split = cut_model(model, 1, head_on_client=head_on_client)
    # Execute: the client's forward, the server's layers (and head), the client's backward
    activations = split.client_forward(ids, mask)
    if head_on_client:
        received = activations.detach().requires_grad_(True)
        top = split.middle_forward(received, mask)
        loss, grad_top = split.head_step(top.detach(), mask, labels)
        top.backward(grad_top)
        grad_at_cut = received.grad
    else:
        step = split.server_step(activations, mask, labels)
        loss, grad_at_cut = step.loss, step.grad_at_cut
    activations.backward(grad_at_cut)
    # Assert: the same loss and every weight's gradient as the unsplit model's
    torch.testing.assert_close(loss, whole.loss.detach())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5)
    head = set(split.client_parameters() if head_on_client else split.server_parameters())
    assert "lm_head.weight" in head and "model.norm.weight" in head


def test_a_tied_lm_head_must_stay_with_the_embeddings_on_the_client() -> None:
    with pytest.raises(ConfigError, match="ties its LM head to its input embeddings.*--split-head client"):
        cut_model(_causal_lm(tie=True), 1)
    split = cut_model(_causal_lm(tie=True), 1, head_on_client=True)
    assert "model.embed_tokens.weight" in split.client_parameters() and not any(
        "embed" in name or "lm_head" in name for name in split.server_parameters())


def test_split_forward_equals_unsplit_forward_with_lora_on_the_client_half(tiny_bert: str) -> None:
    # Prepare: LoRA on layer 0, its B factors made non-zero so the adapters change the output
    from fedcustom.config import MethodConfig
    from fedcustom.methods import get_method

    model, batch = _model_and_batch(tiny_bert)
    model = get_method("split").build(model, MethodConfig(name="split", cut_layer=1, split_client="lora"),
                                      "classification", None).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    split = cut_model(model, cut_layer=1)
    # Execute
    with torch.no_grad():
        whole = model(**batch).logits
        halves = split.server_forward(split.client_forward(**batch), batch["attention_mask"])
    # Assert
    assert torch.allclose(halves, whole, atol=1e-5)
    assert all("lora_" in n for n in split.client_parameters())


def test_u_shaped_gradients_equal_autograd_of_whole_model(tiny_bert: str) -> None:
    # Prepare: the whole model's gradients at the cut and at the last hidden states
    model, batch = _model_and_batch(tiny_bert)
    labels = torch.tensor([1, 0, 1])
    captured = {}
    hooks = [model.base_model.encoder.layer[i].register_forward_hook(
        lambda _m, _i, out, key=key: captured.setdefault(key, out).retain_grad()) for i, key in ((0, "cut"), (1, "top"))]
    torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    for hook in hooks:
        hook.remove()
    expected = {k: v.grad.clone() for k, v in captured.items()}
    whole_classifier_grad = model.classifier.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    split = cut_model(model, cut_layer=1, head_on_client=True)
    # Execute: client bottom -> server middle -> client head (loss on its own labels) -> server -> client
    activations = split.client_forward(**batch)
    received = activations.detach().requires_grad_(True)
    top = split.middle_forward(received, batch["attention_mask"])
    _, grad_top = split.head_step(top.detach(), batch["attention_mask"], labels)
    top.backward(grad_top)
    activations.backward(received.grad)
    # Assert
    assert torch.allclose(grad_top, expected["top"], atol=1e-6)
    assert torch.allclose(received.grad, expected["cut"], atol=1e-6)
    assert torch.allclose(model.classifier.weight.grad, whole_classifier_grad, atol=1e-6)
    assert any("classifier" in n for n in split.client_parameters())
    assert not any("classifier" in n or "pooler" in n for n in split.server_parameters())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_client_half_prefixes_act_as_peft_prefix_tuning_on_those_layers(backbone: str,
                                                                        request: pytest.FixtureRequest) -> None:
    # Prepare: PEFT prefix tuning on the whole model, and our client-half prefixes set to its first layer's
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from fedcustom.config import MethodConfig
    from fedcustom.methods import get_method

    path = request.getfixturevalue(backbone)
    model, batch = _model_and_batch(path)
    peft_model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path).eval(),
                                PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    config = peft_model.peft_config["default"]
    table = peft_model.prompt_encoder["default"].embedding.weight  # (P, layers * 2 * heads * head_dim)
    per_layer = table.view(4, config.num_layers, 2, config.num_attention_heads, -1).permute(1, 2, 3, 0, 4)
    wrapped = get_method("split").build(model, MethodConfig(name="split", cut_layer=1, split_client="prefix",
                                                            num_virtual_tokens=4), "classification", None)
    with torch.no_grad():
        wrapped.client_prefix.weight.copy_(per_layer[:1])
    split = cut_model(wrapped, cut_layer=1)
    # Execute
    with torch.no_grad():
        expected = peft_model(**batch, output_hidden_states=True).hidden_states[1]  # after layer 0
        ours = split.client_forward(**batch)
        bare = cut_model(model, cut_layer=1).client_forward(**batch)
    # Assert: the same activations at the cut as PEFT's prefixes give, and not the bare model's
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, bare, atol=1e-3)
    assert list(split.client_parameters()) == ["client_prefix.weight"]
