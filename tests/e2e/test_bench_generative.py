"""`fedcustom bench --preset generative`: the preset machinery on a tiny random LLaMA (structure only, never
timings)."""

from __future__ import annotations

import json
import os
import random
import tomllib
from pathlib import Path

import pytest
from rich.console import Console

from fedcustom.bench import run_sweep_bench
from fedcustom.bench.generative import PLOT, flat, rows
from fedcustom.bench.sweep import SWEEPS_DIR, merge, parse_sweep

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


def tiny_sweep(model: str, dataset: str, methods: dict[str, float], rounds: int = 2, **method_options) -> object:
    """The shipped generative sweep on a tiny LLaMA and the toy Q/A rows, with the given methods and rates."""
    raw = tomllib.loads((SWEEPS_DIR / "generative.toml").read_text())
    raw["base"] = merge(raw["base"], {
        "model": {"name": model, "max_length": 16}, "data": {"dataset": dataset, "max_train_examples": 40,
                                                            "max_eval_examples": 8},
        "method": {"num_virtual_tokens": 4}, "federation": {"clients": 2, "rounds": rounds, "local_steps": 2},
        "generation": {"chat_template": False, "max_new_tokens": 3, "eval_generations": 4},
        "train": {"batch_size": 8}})
    axis = {v["label"]: v for v in raw["axis"]["method"]}
    raw["axis"]["method"] = []
    for method, lr in methods.items():
        value = axis[method]
        value["set"]["train"]["lr"] = lr
        value["set"]["method"].update({k: v for k, v in method_options.items() if k in value["set"]["method"]})
        raw["axis"]["method"].append(value)
    return parse_sweep(raw, str(SWEEPS_DIR / "generative.toml"))


def test_generative_preset_writes_report_results_and_plot(tmp_path: Path, tiny_llama: str, qa_jsonl: str) -> None:
    # Prepare
    sweep = tiny_sweep(tiny_llama, qa_jsonl, {"lora": 1e-2, "prompt": 3e-2, "split": 3e-3, "distill": 1e-2},
                       cut_layer=1, public_size=8, topk=4)
    out = tmp_path / "generative"
    out.mkdir()
    # Execute
    result = run_sweep_bench(sweep, "/", out, "fedcustom bench --preset generative", Console(quiet=True))
    # Assert: one row per method, carrying what each run's summary measured (federated and centralized)
    records = flat(result["stages"]["all"], out / "runs")
    result_rows = rows(records)
    assert [r["method"] for r in result_rows] == ["lora", "prompt", "split", "distill"]
    for row, record in zip(result_rows, result["stages"]["all"]):
        summary = json.loads((out / "runs" / record["run_dir"] / "summary.json").read_text())
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
    assert len(records[0]["perplexity_per_round"]) == 2 + 1 and records[0]["samples"]
    report = (out / "report.md").read_text()
    assert "| lora | 0.01 |" in report and "| prompt | 0.03 |" in report and f"![perplexity vs round]({PLOT})" in report
    assert "layers [0, 1) and the LM head (tied to the embeddings)" in report and "8 public pairs" in report
    assert "LoRA on both sides; the centralized baseline trains LoRA" in report
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())["stages"]["all"]
    assert [r["summary"]["final_perplexity"] for r in saved] == [r["final_perplexity"] for r in records]


def test_a_rerun_reuses_finished_runs(tmp_path: Path, tiny_llama: str, qa_jsonl: str) -> None:
    # Prepare
    sweep = tiny_sweep(tiny_llama, qa_jsonl, {"lora": 1e-2}, rounds=1)
    out = tmp_path / "generative"
    out.mkdir()
    first = run_sweep_bench(sweep, "/", out, "first", Console(quiet=True))
    # Execute
    second = run_sweep_bench(sweep, "/", out, "second", Console(quiet=True))
    # Assert
    assert [r["reused"] for r in first["stages"]["all"]] == [False]
    assert [r["reused"] for r in second["stages"]["all"]] == [True]
    assert rows(flat(second["stages"]["all"], out / "runs")) == rows(flat(first["stages"]["all"], out / "runs"))
