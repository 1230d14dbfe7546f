"""`fedcustom bench --preset robust` (sweeps/robust.toml): the preset on a tiny random BERT (structure only, never
timings), with the update norms its report module records through the sweep runner's instrument hook."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedcustom.bench import run_sweep_bench
from fedcustom.bench.robust import NORMS_FILE, PLOT, flat, norm_stats, rows
from fedcustom.bench.sweep import SWEEPS_DIR, merge, parse_sweep

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sweep(tiny_bert: str, toy_csv: str, clients: int, rounds: int, strategies: list[dict], fractions: list[float],
           rows_: int) -> object:
    """The shipped robust sweep on the toy corpus: LoRA only, the given strategies and attacker shares."""
    raw = tomllib.loads((SWEEPS_DIR / "robust.toml").read_text())
    raw["base"] = merge(raw["base"], {"model": {"name": tiny_bert, "max_length": 16},
                                      "data": {"dataset": toy_csv, "eval_dataset": toy_csv, "max_train_examples": rows_},
                                      "federation": {"clients": clients, "rounds": rounds}})
    raw["axis"]["strategy"] = strategies
    raw["axis"]["fraction"] = [{"label": f"attackers{round(100 * f)}", "attacker_share": f,
                                "set": {"adversary": {"fraction": f}}} for f in fractions]
    raw["stages"] = {"lora": {"axis": {"method": ["lora"]}}}
    return parse_sweep(raw, str(SWEEPS_DIR / "robust.toml"))


def _strategy(label: str, name: str, spec: str) -> dict:
    return {"label": label, "strategy_name": name, "set": {"federation": {"strategy": spec}}}


def test_robust_preset_writes_report_results_and_plot(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: 5 clients, fedavg and norm-bound (C = 0.05), 0% and 40% sign-flip attackers
    sweep = _sweep(tiny_bert, toy_csv, 5, 2, [_strategy("fedavg", "fedavg", "fedavg"),
                                              _strategy("norm-bound0.05", "norm-bound", "norm-bound:0.05")],
                   [0.0, 0.4], 60)
    out = tmp_path / "robust"
    out.mkdir()
    # Execute
    result = run_sweep_bench(sweep, "/", out, "fedcustom bench --preset robust", Console(quiet=True))
    # Assert: one row per (strategy, fraction), carrying the accuracy each run's summary measured
    records = flat(result["stages"]["lora"], out / "runs")
    result_rows = rows(records)
    assert [(r["strategy_spec"], r["fraction"]) for r in result_rows] == [
        ("fedavg", 0.0), ("fedavg", 0.4), ("norm-bound:0.05", 0.0), ("norm-bound:0.05", 0.4)]
    for row, record in zip(result_rows, result["stages"]["lora"]):
        summary = json.loads((out / "runs" / record["run_dir"] / "summary.json").read_text())
        assert row["accuracy"] == summary["final_accuracy"] and summary["strategy"] == row["strategy_spec"]
        assert len(row["malicious_clients"]) == round(row["fraction"] * 5)
        assert summary["malicious_clients"] == row["malicious_clients"]
    by_key = {(r["strategy"], r["fraction"]): r for r in result_rows}
    attacked = by_key[("norm-bound", 0.4)]
    assert attacked["drop_vs_same_strategy_clean"] == pytest.approx(
        100 * (by_key[("norm-bound", 0.0)]["accuracy"] - attacked["accuracy"]))
    assert attacked["drop_vs_fedavg_clean"] == pytest.approx(
        100 * (by_key[("fedavg", 0.0)]["accuracy"] - attacked["accuracy"]))
    assert by_key[("fedavg", 0.0)]["drop_vs_fedavg_clean"] == 0.0
    # every merged update's norm was recorded: 5 per round, the attackers' 10x flipped ones the largest
    (norms,) = norm_stats(records)
    assert norms["c"] == 0.05 and norms["updates"] == 5 * 2
    assert norms["attacker_median"] > norms["honest_median"]
    report = (out / "report.md").read_text()
    assert "| lora | norm-bound:0.05 |" in report and "## Norm bound: how C was chosen" in report
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())["stages"]["lora"]
    assert [r["summary"]["final_accuracy"] for r in saved] == [r["final_accuracy"] for r in records]


def test_a_rerun_reuses_finished_runs_but_not_one_without_its_norms(tmp_path: Path, tiny_bert: str,
                                                                    toy_csv: str) -> None:
    # Prepare
    sweep = _sweep(tiny_bert, toy_csv, 4, 1, [_strategy("median", "median", "median")], [0.0], 40)
    out = tmp_path / "robust"
    out.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's own setting (make test's workers have one thread), for the bench to keep
    try:
        first = run_sweep_bench(sweep, "/", out, "first", Console(quiet=True))
        assert torch.get_num_threads() == 1  # a run in the caller's process left its torch threads alone
        assert first["stages"]["lora"][0]["summary"]["torch_threads"] == 1  # what the run itself used
        assert "torch threads per run: 1 (1 run);" in (out / "report.md").read_text()
    finally:
        torch.set_num_threads(threads)
    # Execute
    second = run_sweep_bench(sweep, "/", out, "second", Console(quiet=True))
    (out / "runs" / second["stages"]["lora"][0]["run_dir"] / NORMS_FILE).unlink()  # the measurement went missing
    third = run_sweep_bench(sweep, "/", out, "third", Console(quiet=True))
    # Assert: reused with its norms; run again without them
    assert [r["reused"] for r in first["stages"]["lora"]] == [False]
    assert [r["reused"] for r in second["stages"]["lora"]] == [True]
    assert [r["reused"] for r in third["stages"]["lora"]] == [False]
    assert second["stages"]["lora"][0]["summary"]["final_accuracy"] == first["stages"]["lora"][0]["summary"]["final_accuracy"]
