"""`fedcustom bench --preset generative`: the preset machinery on a tiny random LLaMA (structure only, never
timings)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from rich.console import Console

from fedcustom.bench import run_generative_bench
from fedcustom.bench.generative import PLOT, GenerativeSetting, rows

from conftest import FILLER, NEGATIVE, POSITIVE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Instruction rows with a learnable answer: a sentiment word in the prompt decides a two-word response."""
    rng = random.Random(0)
    lines = []
    for i in range(80):
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if i % 2 == 0 else NEGATIVE)]
        lines.append(json.dumps({"instruction": " ".join(words), "output": "good great" if i % 2 == 0 else "bad awful",
                                 "topic": "plot"}) + "\n")
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(lines))
    return str(path)


def tiny_setting(model: str, dataset: str, **overrides) -> GenerativeSetting:
    values = dict(model=model, dataset=dataset, chat_template=False, max_train=40, max_eval=8, max_length=16,
                  clients=2, rounds=2, local_steps=2, batch_size=8, max_new_tokens=3, eval_generations=4,
                  num_virtual_tokens=4, methods=(("lora", 1e-2), ("prompt", 3e-2)))
    return GenerativeSetting(**{**values, **overrides})


def test_generative_preset_writes_report_results_and_plot(tmp_path: Path, tiny_llama: str, qa_jsonl: str) -> None:
    # Prepare
    setting = tiny_setting(tiny_llama, qa_jsonl, cut_layer=1, public_size=8, topk=4,
                           methods=(("lora", 1e-2), ("prompt", 3e-2), ("split", 3e-3), ("distill", 1e-2)))
    out = tmp_path / "generative"
    out.mkdir()
    # Execute
    result = run_generative_bench(out, "fedcustom bench --preset generative", Console(quiet=True), setting)
    # Assert: one row per method, carrying what each run's summary measured (federated and centralized)
    assert [r["method"] for r in result["rows"]] == ["lora", "prompt", "split", "distill"]
    for row in result["rows"]:
        summary = json.loads((out / "runs" / row["method"] / "summary.json").read_text())
        assert summary["task"] == "causal-lm" and summary["learning_rate"] == row["lr"]
        for key in ("initial_perplexity", "final_perplexity", "centralized_perplexity", "final_rouge_l",
                    "centralized_rouge_l", "final_exact_match", "trainable_params", "wall_seconds"):
            assert row[key] == summary[key]
        assert row["perplexity_gap"] == pytest.approx(summary["final_perplexity"] - summary["centralized_perplexity"])
        assert row["rouge_l_gap"] == pytest.approx(summary["final_rouge_l"] - summary["centralized_rouge_l"])
        assert row["mb_up"] == pytest.approx(summary["bytes_up_per_round"] / 1e6) and row["mb_up"] > 0
        assert row["client_gflops"] == pytest.approx(summary["client_flops_per_round"] / 1e9)
        assert row["client_gflops"] > 0
        assert row["centralized_wall_seconds"] == summary["centralized"]["wall_seconds"]
    run = result["runs"][0]
    assert len(run["perplexity_per_round"]) == setting.rounds + 1 and run["samples"]
    report = (out / "report.md").read_text()
    assert "| lora | 0.01 |" in report and "| prompt | 0.03 |" in report and f"![perplexity vs round]({PLOT})" in report
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))


def test_a_rerun_reuses_finished_runs(tmp_path: Path, tiny_llama: str, qa_jsonl: str) -> None:
    # Prepare
    setting = tiny_setting(tiny_llama, qa_jsonl, rounds=1, methods=(("lora", 1e-2),))
    out = tmp_path / "generative"
    out.mkdir()
    first = run_generative_bench(out, "first", Console(quiet=True), setting)
    # Execute
    second = run_generative_bench(out, "second", Console(quiet=True), setting)
    # Assert
    assert [r["reused"] for r in first["runs"]] == [False] and [r["reused"] for r in second["runs"]] == [True]
    assert rows(second["runs"]) == second["rows"] and second["rows"] == first["rows"]
