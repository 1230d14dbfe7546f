"""`fedcustom bench`: the aggregation math on hand-made records, and the quick preset end to end on the shared
SST-2 / AG News files with a tiny random BERT in place of MiniLM (`bench --model`; structure only, never timings;
the packaged MiniLM's runs are tested in test_integration_minilm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcustom.bench.presets import PRESETS, get_preset
from fedcustom.bench.grid import cells
from fedcustom.bench.report import build_rows, targets
from fedcustom.cli import main
from fedcustom.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


def _record(method: str, split: str, seed: int, acc: float, central: float | None) -> dict:
    return {"dataset": "ag_news", "method": method, "lr": 0.01, "split": split, "seed": seed,
            "final_accuracy": acc, "centralized_accuracy": central, "accuracy_per_round": [0.25, acc],
            "round_wall_seconds": [2.0], "bytes_up_per_round": 1005.0, "bytes_down_per_round": 1005.0,
            "client_flops_per_round": 5e9, "trainable_params": 250, "trainable_bytes_fp32": 1000,
            "flops_vs_forward": 2.5}


def test_rows_pair_gaps_and_drops_by_seed() -> None:
    # Prepare: one dataset with IID and a skewed split, two seeds
    preset = PRESETS["paper"].__class__(**{**PRESETS["paper"].__dict__, "datasets": (PRESETS["paper"].datasets[1],)})
    records = [_record("prefix", "iid", 0, 0.80, 0.81), _record("prefix", "iid", 1, 0.70, 0.74),
               _record("prefix", "dirichlet:1.0", 0, 0.79, None), _record("prefix", "dirichlet:1.0", 1, 0.69, None),
               _record("prefix", "dirichlet:0.1", 0, 0.60, None), _record("prefix", "dirichlet:0.1", 1, 0.66, None)]
    # Execute
    (row,) = build_rows(records, preset)
    gap_target, drop_target, bytes_target = targets([row])
    # Assert
    assert row["accuracy"] == pytest.approx((0.75, 0.0707107), rel=1e-5)
    assert row["gap"][0] == pytest.approx(-0.025)  # mean of -0.01 and -0.04
    assert row["skew_drop"][0] == pytest.approx(0.12)  # mean of 0.20 and 0.04
    assert row["payload_overhead"][0] == pytest.approx(0.005)
    assert gap_target["met"] is False and gap_target["measured"] == "-2.50 points"
    assert drop_target["met"] is False and drop_target["measured"] == "12.00 points"
    assert bytes_target["met"] is True


def test_grid_runs_centralized_once_per_method_and_seed() -> None:
    grid = cells(get_preset("paper"))
    assert len(grid) == 4 * 3 * (1 + 3)
    assert sum(c.centralized for c in grid) == 4 * 3 * 2
    assert len({c.name for c in grid}) == len(grid)


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="expected one of quick, paper, tune"):
        get_preset("huge")


def test_bench_model_is_refused_for_a_preset_that_fixes_its_models(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--preset", "codecs", "--model", "minilm", "--output", str(tmp_path / "out")]) == 2
    assert "bench --model: preset 'codecs' fixes its own models" in capsys.readouterr().err


def test_missing_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--preset", "quick", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "sst2/train.tsv: not found" in capsys.readouterr().err


@pytest.mark.integration
def test_quick_preset_writes_report_results_and_plots(tmp_path: Path, tiny_bert: str) -> None:
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "quick", "--model", tiny_bert, "--data-dir", str(DATA_DIR),
                 "--output", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    summaries = [json.loads(p.read_text()) for p in (out / "runs").rglob("summary.json")]
    assert len(summaries) >= len(result["cells"]) and {s["config"]["model"]["name"] for s in summaries} == {tiny_bert}
    assert [r["method"] for r in result["rows"]] == ["full", "lora", "prompt", "prefix"]
    assert len(result["cells"]) == len(cells(get_preset("quick")))
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"][0] <= 1.0 and row["centralized_accuracy"][0] is not None
        # payload = the trainable fp32 tensors + the safetensors header (names, shapes, offsets) only:
        # a header is a few KB (about 150 B per tensor); a stray frozen weight would add hundreds of KB
        assert 0 < row["payload_overhead_bytes"][0] < 16_000
        assert row["flops_vs_forward"][0] > 1.0
    sizes = {r["method"]: r["trainable_params"] for r in result["rows"]}
    assert sizes["full"] > max(sizes["lora"], sizes["prefix"]) and min(sizes["lora"], sizes["prefix"]) > sizes["prompt"]
    assert result["command"].startswith("fedcustom bench --preset quick")
    assert not list((out / "runs").rglob("*.safetensors"))  # the grid keeps logs and summaries, not weights
    report = (out / "report.md").read_text()
    for heading in ("## Setup", "## Results", "## Label skew", "## Against the paper", "## Targets"):
        assert heading in report
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "accuracy_vs_alpha.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frameworks_preset_compares_the_three_families_and_sweeps(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: the frameworks pipeline on a tiny BERT and the toy corpus, one variant per family and sweep
    from rich.console import Console

    from fedcustom.bench import run_frameworks_bench
    from fedcustom.bench.frameworks import Setting, Variant

    setting = Setting(train=toy_csv, eval=toy_csv, max_train=120, max_length=16, clients=2, rounds=2, model=tiny_bert)
    variants = (
        Variant("lora", "FedLLM LoRA", {"name": "lora"}, 3e-3, ("base", "clients"), centralized=True),
        Variant("kd", "KD-FedLLM", {"name": "distill", "public_size": 20}, 3e-3, ("base", "public")),
        Variant("split-cut1", "Split-FedLLM", {"name": "split", "cut_layer": 1}, 3e-3, ("base", "cut")),
    )
    out = tmp_path / "frameworks"
    out.mkdir()
    # Execute
    result = run_frameworks_bench("/", out, "fedcustom bench --preset frameworks", Console(quiet=True), setting, variants)
    # Assert: every family measured on the same axes; the clients sweep added a 10-client LoRA run
    runs = {r["key"]: r for r in result["runs"]}
    assert set(runs) == {"lora", "kd", "split-cut1", "lora-10clients"}
    assert runs["lora-10clients"]["clients"] == 10 and runs["lora"]["clients"] == 2
    assert {r["family"] for r in runs.values()} == {"FedLLM", "KD-FedLLM", "Split-FedLLM"}
    assert runs["kd"]["public_examples"] == 20 and runs["kd"]["server_flops_per_round"] > 0
    assert runs["split-cut1"]["server_flops_per_round"] > 0 and runs["lora"]["server_flops_per_round"] is None
    assert runs["lora"]["centralized_accuracy"] is not None
    assert runs["kd"]["bytes_up_per_round"] < runs["lora"]["bytes_up_per_round"] < runs["split-cut1"]["bytes_up_per_round"]
    report = (out / "report.md").read_text()
    assert "## All frameworks" in report and "## Split-FedLLM: where the model is cut" in report
    assert "## KD-FedLLM: size of the public set" in report and "Centralized reference" in report
    assert (out / "accuracy_vs_mb.png").stat().st_size > 0 and (out / "flops.png").stat().st_size > 0


def test_a_finished_run_is_reused_only_when_its_config_is_the_same() -> None:
    from fedcustom.bench.reuse import same_config
    from fedcustom.config import build_config

    cfg = build_config({"method": {"name": "lora"}})
    recorded = cfg.to_dict()
    older = {k: v for k, v in recorded.items() if k != "codec"}  # recorded before the [codec] section existed
    assert same_config(recorded, cfg) and same_config(older, cfg)
    assert not same_config(older, build_config({"method": {"name": "lora"}, "codec": {"up": "int8"}}))
    assert not same_config(recorded, build_config({"method": {"name": "lora", "lora_r": 4}}))
    assert not same_config({**recorded, "removed": {}}, cfg) and not same_config(None, cfg)


def test_codecs_preset_reports_bytes_accuracy_and_the_target(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare
    from rich.console import Console

    from fedcustom.bench import run_codecs_bench
    from fedcustom.bench.codecs import CodecSetting

    setting = CodecSetting(train=toy_csv, eval=toy_csv, max_train=120, max_length=16, clients=2, rounds=2,
                           model=tiny_bert, methods=(("full", 3e-3),))
    chains = {"raw fp32": "raw", "GradualDiff-Fed": "gradualdiff", "delta,topk:0.05,int8,zstd": "delta,topk:0.05,int8,zstd"}
    out = tmp_path / "codecs"
    out.mkdir()
    # Execute
    result = run_codecs_bench("/", out, "fedcustom bench --preset codecs", Console(quiet=True), setting, chains)
    # Assert
    rows = {r["chain"]: r for r in result["rows"]}
    assert rows["raw fp32"]["up_reduction"] == 1.0 and rows["raw fp32"]["delta_points"] == 0.0
    assert rows["GradualDiff-Fed"]["up_reduction"] > 1.0 and rows["GradualDiff-Fed"]["delta_points"] == 0.0  # lossless
    assert rows["delta,topk:0.05,int8,zstd"]["up_reduction"] > 10
    assert result["targets"][0]["target"].startswith("full fine-tuning")
    assert "| full | GradualDiff-Fed |" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_cumulative_mb.png").stat().st_size > 0
