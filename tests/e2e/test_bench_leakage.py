"""`fedcustom bench --preset leakage` (sweeps/leakage.toml) on a tiny random BERT: each run measured by the report
module's instrument hook, reused only with its measurement (structure only, never timings)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from rich.console import Console

from fedcustom.bench import run_sweep_bench
from fedcustom.bench.leakage import PLOT
from fedcustom.bench.sweep import SWEEPS_DIR, merge, parse_sweep

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_leakage_preset_measures_each_run_and_reports_the_targets(tmp_path: Path, tiny_bert: str,
                                                                  toy_csv: str) -> None:
    # Prepare: the shipped sweep on the toy corpus, LoRA without DP and with noise 1
    raw = tomllib.loads((SWEEPS_DIR / "leakage.toml").read_text())
    raw["base"] = merge(raw["base"], {"model": {"name": tiny_bert, "max_length": 16},
                                      "data": {"dataset": toy_csv, "eval_dataset": toy_csv, "max_train_examples": 40,
                                               "max_eval_examples": 20},
                                      "federation": {"clients": 2, "rounds": 1, "local_epochs": 2}})
    raw["axis"]["noise"] = [n for n in raw["axis"]["noise"] if n["label"] in ("noise0", "noise1")]
    sweep = parse_sweep(raw, str(SWEEPS_DIR / "leakage.toml"))
    out = tmp_path / "leakage"
    out.mkdir()
    # Execute: only LoRA's stage, then again (reused), then again after one measurement went missing
    first = run_sweep_bench(sweep, "/", out, "fedcustom bench --preset leakage --stage lora", Console(quiet=True),
                            stages=["lora"])
    second = run_sweep_bench(sweep, "/", out, "again", Console(quiet=True), stages=["lora"])
    runs = first["stages"]["lora"]
    folder = out / "runs" / runs[1]["run_dir"]
    summary = json.loads((folder / "summary.json").read_text())
    del summary["leakage"]
    (folder / "summary.json").write_text(json.dumps(summary))
    third = run_sweep_bench(sweep, "/", out, "third", Console(quiet=True), stages=["lora"])
    # Assert: both attacks on both targets in every run's summary; epsilon only with DP
    assert [r["labels"]["noise"] for r in runs] == ["noise0", "noise1"]
    assert first["stages"]["prefix"] == [] and first["stages"]["full"] == []
    for r in runs:
        for target in ("global_model", "client_update"):
            assert 0.0 <= r["summary"]["leakage"][target]["reference_ratio"]["auc"] <= 1.0
    assert runs[0]["summary"]["final_epsilon"] is None and runs[1]["summary"]["final_epsilon"] > 0
    assert [r["reused"] for r in second["stages"]["lora"]] == [True, True]
    assert [r["reused"] for r in third["stages"]["lora"]] == [True, False]
    assert first["targets"][0].startswith("- lora:")
    report = (out / "report.md").read_text()
    assert "| lora | 0 | - |" in report and "| lora | 1 |" in report
    assert "Not run yet" in report and "prefix noise 0," in report
    assert "client-level, at delta 1e-05, after the last round" in report  # the config's delta
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
