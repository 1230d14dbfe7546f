"""Per-client evaluation (issue 21, item 1): each client holds out part of its rows; every round the global model is
scored on each client's held-out rows, which no one trains on."""

from __future__ import annotations

import json

import pytest

from fedcustom.assemble import check_runtime_support
from fedcustom.codecs import RawCodec
from fedcustom.config import ConfigError
from fedcustom.methods import load_trainable_state
from fedcustom.runner import build_job, execute
from fedcustom.training import evaluate


def test_each_client_is_scored_on_rows_it_held_out(tiny_config) -> None:
    # Prepare
    cfg = tiny_config(method__name="lora", federation__clients=3, federation__client_eval_fraction=0.25,
                      train__centralized=True)
    job = build_job(cfg)
    data = job.data
    # Execute
    summary = execute(job)
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    # Assert: held-out rows are a quarter of each client's, disjoint from what it (and the baseline) trains on
    for c in range(3):
        held, kept = set(data.client_eval_indices[c]), set(data.client_indices[c])
        assert held and not held & kept and abs(len(held) - 0.25 * (len(held) + len(kept))) <= 1
    assert summary["train_examples"] == sum(len(rows) for rows in data.client_indices)
    # every round, every client has a score; the summary's final scores are the global model's on those rows
    assert all(set(r["client_eval"]) == {"0", "1", "2"} for r in log)
    assert set(summary["client_accuracy"]) == {"0", "1", "2"}
    load_trainable_state(job.model, job.server.global_state)
    for c in range(3):
        own = evaluate(job.model, data.client_held_out(c).table, job.tokenizer, 32)["accuracy"]
        assert summary["client_accuracy"][str(c)] == pytest.approx(own, abs=1e-9)
    scores = sorted(summary["client_accuracy"].values())
    assert summary["client_accuracy_worst10"] == scores[0]
    assert summary["client_accuracy_mean"] == pytest.approx(sum(scores) / 3)
    assert len(summary["client_accuracy_mean_per_round"]) == len(log)
    # the evaluate messages' bytes, beside the training exchange's: the raw global tensors to every node every round
    raw = len(RawCodec().encode(job.server.global_state))
    assert all(r["bytes_eval"] == {"0": raw, "1": raw, "2": raw} for r in log)
    assert summary["bytes_eval_total"] == 3 * raw * len(log)


@pytest.mark.parametrize("overrides, expected", [
    ({"federation__client_eval_fraction": 1.0}, "is not in [0, 1)"),
    ({"federation__client_eval_fraction": 0.2, "method__name": "split"}, "has no single one per round"),
])
def test_per_client_evaluation_mistakes_are_named(tiny_config, overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace(")", r"\)")):
        check_runtime_support(tiny_config(**overrides))


def _answers_after(prompts: list[str], rows, tokenizer) -> bool:
    """Whether each tokenized row is its prompt's tokens followed by the answer (labels ignore the prompt)."""
    for prompt, row in zip(prompts, rows, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if row["input_ids"][:len(ids)] != ids or any(label != -100 for label in row["labels"][:len(ids)]):
            return False
    return True


def test_a_causal_lm_client_answers_the_prompts_of_its_own_held_out_rows(causal_config, monkeypatch) -> None:
    # Prepare: record the prompts each scoring generates from (the ROUGE-L a client reports is on these)
    from fedcustom import causal_lm

    asked: list[list[str]] = []
    monkeypatch.setattr(causal_lm, "generate",
                        lambda _model, _tokenizer, prompts, *_args: asked.append(list(prompts)) or [""] * len(prompts))
    cfg = causal_config(federation__clients=3, federation__client_eval_fraction=0.25, federation__rounds=1,
                        generation__eval_generations=100)
    job = build_job(cfg)
    # Execute
    summary = execute(job)
    # Assert: the last round's three client scorings answered the prompts of each client's own held-out rows
    # (before the fix they answered the global test prompts, the same for every client)
    assert set(summary["client_rouge_l"]) == {"0", "1", "2"}
    for client, prompts in enumerate(asked[-3:]):
        held = job.data.client_held_out(client).table
        assert len(prompts) == len(held) and _answers_after(prompts, held, job.tokenizer)


def test_a_flower_node_scores_the_prompts_of_the_rows_it_holds_out_of_its_own_file(causal_config, toy_jsonl) -> None:
    # Prepare: the node-side tables of partition 1 from its own file (as `--node-config data-path=...` gives)
    from fedcustom.deploy.flower.node import _own_tables
    from fedcustom.models import load_tokenizer
    from fedcustom.runtime import ClientSetup

    cfg = causal_config(federation__clients=3, federation__client_eval_fraction=0.25)
    tokenizer = load_tokenizer(cfg.model.name)
    # Execute
    rows, held = _own_tables(cfg, ClientSetup(["actors", "plot"]), 1, toy_jsonl, tokenizer)
    # Assert: a quarter of the file held out, each held-out row with its own prompt and answer
    assert abs(len(held) - 0.25 * (len(rows) + len(held))) <= 1
    assert len(held.prompts) == len(held.references) == len(held)
    assert _answers_after(held.prompts, held.table, tokenizer)
    assert set(held.references) <= {"good great", "bad awful"}
