"""Federated instruction tuning of a causal LM (tiny random LLaMA): loss masking, every
parameter-sharing method learns, the adapter generates, and bad input gets clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedcustom.config import build_config
from fedcustom.data import make_loader
from fedcustom.data.causal import InstructionRows, tokenize_rows
from fedcustom.data.features import IGNORE_INDEX
from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.generation import generate
from fedcustom.models import load_tokenizer
from fedcustom.protocols.distill.knowledge import encode_knowledge
from fedcustom.protocols.distill.public_set import TokenPublicSet
from fedcustom.runner import build_job, execute


# Learning rates that move the tiny random LLaMA within 3 rounds.
CAUSAL_LR = {"full": 3e-3, "lora": 1e-2, "prompt": 3e-2, "prefix": 3e-2, "split": 3e-3, "distill": 1e-2}


def test_loss_is_masked_to_response_tokens(tiny_llama: str) -> None:
    # Prepare
    tokenizer = load_tokenizer(tiny_llama)
    rows = InstructionRows(["the movie was good", "the plot"], ["great", "bad awful"], [0, 0])
    # Execute
    table = tokenize_rows(rows, tokenizer, 16, "test rows")
    batch = next(iter(make_loader(table, tokenizer, 2, seed=None)))
    # Assert: -100 on every prompt token and on padding; the response tokens are their own labels
    for i, (prompt, response) in enumerate(zip(rows.prompts, rows.responses)):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        labels, ids = batch["labels"][i].tolist(), batch["input_ids"][i].tolist()
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:n_prompt + len(response_ids)] == response_ids == ids[n_prompt:n_prompt + len(response_ids)]
        length = int(batch["attention_mask"][i].sum())
        assert all(label == IGNORE_INDEX for label in labels[length:])


SPLIT = {"method__cut_layer": 1}
METHODS = {"full": {}, "lora": {}, "prompt": {}, "prefix": {}, "split": SPLIT,
           "split-u-shaped": {**SPLIT, "method__split_head": "client"},
           "distill": {"method__public_size": 24, "method__topk": 4, "method__local_method": "lora"}}


@pytest.mark.parametrize("variant", list(METHODS))
def test_each_method_learns_the_instructions(causal_config, variant: str) -> None:
    # Prepare
    method = variant.split("-")[0]
    cfg = causal_config(method__name=method, train__lr=CAUSAL_LR[method], **METHODS[variant])
    # Execute
    job = build_job(cfg)
    summary = execute(job)
    # Assert: the held-out response loss falls; the round log carries generation metrics and samples
    lines = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert lines[-1]["eval_loss"] < 0.8 * lines[0]["eval_loss"]
    assert summary["final_perplexity"] < summary["initial_perplexity"]
    assert 0 <= summary["final_rouge_l"] <= 1 and 0 <= summary["final_exact_match"] <= 1
    assert len(lines[-1]["eval_samples"]) == 2 and set(lines[-1]["eval_samples"][0]) == {"prompt", "reference", "generation"}
    assert summary["task"] == "causal-lm" and summary["bytes_up_per_round"] > 0


def test_token_knowledge_is_the_next_token_distribution_on_each_public_response_token(tiny_llama: str) -> None:
    # Prepare: two public pairs with prompts of different lengths (the batch pads one of them)
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    pairs = [["the movie was good and", "good great"], ["the plot", "bad awful"]]
    public = TokenPublicSet(pairs, tokenizer, 16)
    # Execute
    logits, _ = public.logits(model, batch_size=2, count_flops=False)
    # Assert: one knowledge row per response token (and EOS), the model's own prediction of that token
    expected = []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []  # as tokenize_rows appends
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0]
        expected.append(out[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(response_ids)])
    assert public.rows == sum(len(rows) for rows in expected) == len(logits)
    torch.testing.assert_close(logits, torch.cat(expected), atol=1e-5, rtol=1e-4)
    # Assert: top-k ids of a vocabulary past int16's range travel as int32
    assert encode_knowledge(torch.randn(3, 40), 4, 1.0)["topk_indices"].dtype == torch.int16
    assert encode_knowledge(torch.randn(3, 40_000), 4, 1.0)["topk_indices"].dtype == torch.int32


def test_federated_adapter_loads_in_plain_peft_and_changes_generations(causal_config, tiny_llama: str) -> None:
    # Prepare: federated LoRA until the answers are learned
    job = build_job(causal_config(train__lr=CAUSAL_LR["lora"], federation__rounds=4))
    summary = execute(job)
    tokenizer = load_tokenizer(tiny_llama)
    prompt = ["was movie the superb"]
    # Execute: the saved adapter through plain PEFT, and the bare backbone
    bare = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = generate(bare, tokenizer, prompt, max_new_tokens=2)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), job.out / "adapter")
    answer = generate(tuned, tokenizer, prompt, max_new_tokens=2)
    # Assert
    assert answer != plain
    assert summary["final_rouge_l"] > summary["initial_rouge_l"]


def test_topic_partition_puts_each_topic_on_one_client(causal_config) -> None:
    job = build_job(causal_config(data__partition="column:topic"))
    histograms = [row["label_histogram"] for row in job.data.client_stats()]
    assert all(sum(1 for count in column if count) == 1 for column in zip(*histograms))


def test_causal_lm_errors_are_clear(causal_config, tmp_path: Path) -> None:
    with pytest.raises(FedCustomError, match="prompts leave no room for a response within --max-length 3"):
        build_job(causal_config(model__max_length=3))
    with pytest.raises(FedCustomError, match="chat template"):
        build_job(causal_config(generation__chat_template=True))
    with pytest.raises(ConfigError, match="--method distill: set --topk K"):
        causal_config(method__name="distill")
    with pytest.raises(ConfigError, match="column partitions need --task causal-lm"):
        causal_config(model__task="classification", data__partition="column:topic")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "the movie"}) + "\n")
    with pytest.raises(FedCustomError, match="bad.jsonl"):
        build_job(causal_config(data__dataset=str(bad)))


def test_partition_by_a_missing_column_names_the_columns(causal_config) -> None:
    with pytest.raises(FedCustomError, match="no column 'region'; it has topic"):
        build_job(causal_config(data__partition="column:region"))


@pytest.mark.integration
def test_federated_lora_on_real_smollm2_with_chatterbot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The packaged SmolLM2-135M-Instruct and chatterbot corpus, a handful of rows: the whole path runs and
    the saved adapter answers through `fedcustom generate`."""
    from fedcustom.cli import main

    # Prepare
    cfg = build_config({
        "model": {"name": "smollm2", "task": "causal-lm", "max_length": 128},
        "data": {"dataset": "chatterbot", "partition": "column:topic", "max_train_examples": 16,
                 "max_eval_examples": 4},
        "method": {"name": "lora"},
        "federation": {"clients": 2, "rounds": 1, "local_steps": 2},
        "generation": {"max_new_tokens": 8, "eval_generations": 2, "samples": 1},
        "train": {"batch_size": 4, "lr": 5e-4, "count_flops": False},
        "output": {"dir": str(tmp_path / "out"), "quiet": True},
    })
    # Execute
    job = build_job(cfg)
    summary = execute(job)
    # Assert: finite perplexities, chat-templated prompts, a sample answer, an adapter that generates
    assert 1 < summary["final_perplexity"] < 1e4 and 1 < summary["initial_perplexity"] < 1e4
    assert job.data.test.prompts[0].startswith("<|im_start|>")
    assert summary["rejected_updates"] == 0 and len(summary["client_data"]) == 2
    capsys.readouterr()
    code = main(["generate", "--adapter", str(tmp_path / "out" / "adapter"), "--max-new-tokens", "8", "What is AI?"])
    assert code == 0 and capsys.readouterr().out.strip()


def test_knowledge_rows_skip_prompt_tunings_virtual_tokens(causal_config) -> None:
    # Prepare: logits of 2 rows with 3 virtual tokens in front of 5 input positions; row 0's response is its last
    # 2 tokens, row 1's its last 3
    from fedcustom.protocols.distill.public_set import response_positions

    logits = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3:], labels[1, 2:] = 7, 7
    # Execute
    rows = response_positions(logits, labels)
    # Assert: the positions that predict each response token, counted after the virtual tokens
    assert rows.flatten().tolist() == [3 + 2, 3 + 3, 8 + 3 + 1, 8 + 3 + 2, 8 + 3 + 3]
    # and a KD-FedLLM run whose clients prompt-tune a causal LM gets through its rounds (it once raised IndexError)
    cfg = causal_config(method__name="distill", method__public_size=24, method__topk=4, method__local_method="prompt",
                        train__lr=CAUSAL_LR["prompt"], federation__rounds=1)
    summary = execute(build_job(cfg))
    assert summary["rounds"] == 1 and summary["bytes_up_per_round"] > 0
