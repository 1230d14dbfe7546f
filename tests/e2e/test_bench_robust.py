"""`fedcustom bench --preset robust`: the preset machinery on a tiny random BERT (structure only, never timings)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from fedcustom.bench import run_robust_bench
from fedcustom.bench.robust import PLOT, RobustSetting, rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_robust_preset_writes_report_results_and_plot(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: 5 clients, fedavg and norm-bound (C from the setting), 0% and 40% sign-flip attackers
    setting = RobustSetting(train=toy_csv, eval=toy_csv, max_train=60, max_length=16, clients=5, rounds=2,
                            model=tiny_bert, methods=(("lora", 3e-3),), fractions=(0.0, 0.4),
                            strategies=("fedavg", "norm-bound"), norm_bound=(("lora", 0.05),))
    out = tmp_path / "robust"
    out.mkdir()
    # Execute
    result = run_robust_bench("/", out, "fedcustom bench --preset robust", Console(quiet=True), setting)
    # Assert: one row per (strategy, fraction), carrying the accuracy each run's summary measured
    assert [(r["strategy_spec"], r["fraction"]) for r in result["rows"]] == [
        ("fedavg", 0.0), ("fedavg", 0.4), ("norm-bound:0.05", 0.0), ("norm-bound:0.05", 0.4)]
    for row in result["rows"]:
        key = row["strategy"].replace(":", "")
        summary = json.loads((out / "runs" / "lora" / key / f"attackers{round(100 * row['fraction'])}"
                              / "summary.json").read_text())
        assert row["accuracy"] == summary["final_accuracy"] and summary["strategy"] == row["strategy_spec"]
        assert len(row["malicious_clients"]) == round(row["fraction"] * setting.clients)
        assert summary["malicious_clients"] == row["malicious_clients"]
    by_key = {(r["strategy"], r["fraction"]): r for r in result["rows"]}
    attacked = by_key[("norm-bound", 0.4)]
    assert attacked["drop_vs_same_strategy_clean"] == pytest.approx(
        100 * (by_key[("norm-bound", 0.0)]["accuracy"] - attacked["accuracy"]))
    assert attacked["drop_vs_fedavg_clean"] == pytest.approx(
        100 * (by_key[("fedavg", 0.0)]["accuracy"] - attacked["accuracy"]))
    assert by_key[("fedavg", 0.0)]["drop_vs_fedavg_clean"] == 0.0
    # every merged update's norm was recorded: 5 per round, the attackers' 10x flipped ones the largest
    (norms,) = result["norm_bound"]
    assert norms["c"] == 0.05 and norms["updates"] == 5 * setting.rounds
    assert norms["attacker_median"] > norms["honest_median"]
    report = (out / "report.md").read_text()
    assert "| lora | norm-bound:0.05 |" in report and "## Norm bound: how C was chosen" in report
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))


def test_a_rerun_reuses_finished_runs(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare
    setting = RobustSetting(train=toy_csv, eval=toy_csv, max_train=40, max_length=16, clients=4, rounds=1,
                            model=tiny_bert, methods=(("lora", 3e-3),), fractions=(0.0,), strategies=("median",))
    out = tmp_path / "robust"
    out.mkdir()
    first = run_robust_bench("/", out, "first", Console(quiet=True), setting)
    # Execute
    second = run_robust_bench("/", out, "second", Console(quiet=True), setting)
    # Assert
    assert [r["reused"] for r in first["runs"]] == [False] and [r["reused"] for r in second["runs"]] == [True]
    assert rows(second["runs"]) == second["rows"] and second["rows"][0]["accuracy"] == first["rows"][0]["accuracy"]
