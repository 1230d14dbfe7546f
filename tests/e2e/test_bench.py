"""`fedcustom bench`: the aggregation math on hand-made records, and the quick preset end to end on the shared
SST-2 / AG News files with a tiny random BERT in place of MiniLM (`bench --model`; structure only, never timings;
the packaged MiniLM's runs are tested in test_integration_minilm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcustom.bench.paper import preset_of
from fedcustom.bench.report import diagnostics
from fedcustom.bench.report import build_rows, targets
from fedcustom.bench.sweep import cells, load_sweep
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
    paper = preset_of(load_sweep("paper"))
    preset = paper.__class__(**{**paper.__dict__, "datasets": (paper.datasets[1],)})
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
    # a seed missing from the IID split (its run not finished): the drop pairs the seeds both have, not positions
    (partial,) = build_rows([r for r in records if (r["split"], r["seed"]) != ("iid", 0)], preset)
    assert partial["skew_drop"] == pytest.approx((0.04, 0.0))  # seed 1 alone: 0.70 - 0.66



def test_a_method_with_no_main_dataset_run_yet_is_reported_as_n_a() -> None:
    # Prepare: the whole paper preset (SST-2 first), but only AG News runs have finished (a sweep run in parts)
    from fedcustom.bench.report import main_table, paper_table, skew_table

    paper = preset_of(load_sweep("paper"))
    records = [_record("prefix", "iid", 0, 0.80, 0.81), _record("prefix", "dirichlet:0.1", 0, 0.60, None)]
    # Execute
    (row,) = build_rows(records, paper)
    tables = [main_table([row], many_lrs=False), paper_table([row]), skew_table([row], many_lrs=False)]
    # Assert: the row and the targets are written, with n/a where there is nothing to show (it raised TypeError),
    # never a "nan" (the main-dataset bytes, compute and time have no run to average yet)
    assert all("| n/a |" in table and "nan" not in table for table in tables[:2])
    assert "| 80.0 ± 0.0 | n/a | 60.0 ± 0.0 | 20.0 ± 0.0 |" in tables[2]  # the skew runs that did finish
    assert targets([row]) == []


def test_grid_runs_centralized_once_per_method_and_seed() -> None:
    sweep = load_sweep("paper")
    grid = [c for stage in sweep.stages for c in cells(sweep, stage)]
    assert len(grid) == 4 * 3 * (1 + 3)
    assert sum(bool(c.values["train"].get("centralized")) for c in grid) == 4 * 3 * 2
    assert len({c.name for c in grid}) == len(grid)


def test_a_grid_sweep_describes_its_preset_for_the_report() -> None:
    preset = preset_of(load_sweep("paper"))
    assert preset.methods == ("full", "lora", "prompt", "prefix") and preset.seeds == (0, 1, 2)
    assert preset.lrs == {"full": (1e-4,), "lora": (3e-3,), "prompt": (1e-1,), "prefix": (3e-2,)}
    assert [(d.key, d.splits) for d in preset.datasets] == [
        ("sst2", ("iid",)), ("ag_news", ("iid", "dirichlet:1.0", "dirichlet:0.1"))]
    assert preset.centralized and (preset.clients, preset.rounds, preset.local_epochs) == (5, 3, 1)
    assert not preset_of(load_sweep("tune")).centralized and len(preset_of(load_sweep("tune")).lrs["lora"]) == 4
    assert preset.virtual_init == "random"  # the grids pin it: their results were measured so


def test_a_grid_report_states_only_the_baseline_and_initialisation_its_sweep_ran() -> None:
    from dataclasses import replace

    from fedcustom.bench.paper import _setup_lines

    paper, tune = preset_of(load_sweep("paper")), preset_of(load_sweep("tune"))
    assert any(line.startswith("- Centralized baseline: same model") for line in _setup_lines(paper))
    assert "- No centralized baseline: this sweep sets `train.centralized = false`." in _setup_lines(tune)
    assert not any(line.startswith("- Centralized baseline") for line in _setup_lines(tune))
    record = {"dataset": "sst2", "split": "iid", "method": "prompt", "bytes_up_per_round": 10,
              "trainable_bytes_fp32": 8, "accuracy_per_round": [0.5, 0.6],
              "client_data": [{"examples": 80, "label_histogram": [40, 40]}],
              "centralized": {"steps": 25, "examples_seen": 400}}
    assert "start from random vectors" in "\n".join(diagnostics([record], paper))
    assert "start from the task initialisation" in "\n".join(diagnostics([record], replace(paper, virtual_init="task")))


def test_unknown_preset_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--preset", "huge"]) == 2
    assert "expected one of" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep("huge")


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
    runs = [r for stage in result["stages"].values() for r in stage]
    assert len(summaries) >= len(runs) and {s["config"]["model"]["name"] for s in summaries} == {tiny_bert}
    assert [r["method"] for r in result["rows"]] == ["full", "lora", "prompt", "prefix"]
    sweep = load_sweep("quick")
    assert len(runs) == sum(len(cells(sweep, stage)) for stage in sweep.stages) == 12
    for row in result["rows"]:
        assert 0.0 <= row["accuracy"][0] <= 1.0 and row["centralized_accuracy"][0] is not None
        # payload = the trainable fp32 tensors + the safetensors header (names, shapes, offsets) only:
        # a header is a few KB (about 150 B per tensor); a stray frozen weight would add hundreds of KB
        assert 0 < row["payload_overhead_bytes"][0] < 16_000
        assert row["flops_vs_forward"][0] > 1.0
    sizes = {r["method"]: r["trainable_params"] for r in result["rows"]}
    assert sizes["full"] > max(sizes["lora"], sizes["prefix"]) and min(sizes["lora"], sizes["prefix"]) > sizes["prompt"]
    assert result["command"].startswith("fedcustom bench --preset quick")
    assert [t["target"].split(" ")[0] for t in result["targets"]] == ["prefix", "prefix", "bytes"]
    assert not list((out / "runs").rglob("*.safetensors"))  # the grid keeps logs and summaries, not weights
    report = (out / "report.md").read_text()
    for heading in ("## Setup", "## Results", "## Label skew", "## Against the paper", "## Targets"):
        assert heading in report
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "accuracy_vs_alpha.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frameworks_preset_compares_the_three_families_and_sweeps(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: the shipped frameworks sweep on a tiny BERT and the toy corpus, one variant per family and study
    import tomllib

    from rich.console import Console

    from fedcustom.bench import run_sweep_bench
    from fedcustom.bench.frameworks import flat
    from fedcustom.bench.sweep import SWEEPS_DIR, merge, parse_sweep

    raw = tomllib.loads((SWEEPS_DIR / "frameworks.toml").read_text())
    raw["base"] = merge(raw["base"], {"model": {"name": tiny_bert, "max_length": 16},
                                      "data": {"dataset": toy_csv, "eval_dataset": toy_csv, "max_train_examples": 120},
                                      "federation": {"clients": 2, "rounds": 2}})
    keep = ("lora", "kd-public25", "split-cut1", "lora-10clients")
    raw["axis"]["variant"] = [v for v in raw["axis"]["variant"] if v["label"] in keep]
    raw["axis"]["variant"][1]["set"]["method"]["public_size"] = 20
    sweep = parse_sweep(raw, str(SWEEPS_DIR / "frameworks.toml"))
    out = tmp_path / "frameworks"
    out.mkdir()
    # Execute
    result = run_sweep_bench(sweep, "/", out, "fedcustom bench --preset frameworks", Console(quiet=True))
    # Assert: every family measured on the same axes; the clients study has a 10-client LoRA run
    runs = {r["key"]: r for r in flat(result["stages"]["all"], sweep)}
    assert set(runs) == set(keep)
    assert runs["lora-10clients"]["clients"] == 10 and runs["lora"]["clients"] == 2
    assert {r["family"] for r in runs.values()} == {"FedLLM", "KD-FedLLM", "Split-FedLLM"}
    kd = runs["kd-public25"]
    assert kd["public_examples"] == 20 and kd["server_flops_per_round"] > 0
    assert runs["split-cut1"]["server_flops_per_round"] > 0 and runs["lora"]["server_flops_per_round"] is None
    assert runs["lora"]["centralized_accuracy"] is not None
    assert kd["bytes_up_per_round"] < runs["lora"]["bytes_up_per_round"] < runs["split-cut1"]["bytes_up_per_round"]
    report = (out / "report.md").read_text()
    assert "## All frameworks" in report and "## Split-FedLLM: where the model is cut" in report
    assert "## KD-FedLLM: size of the public set" in report and "Centralized reference" in report
    assert "| 1 (Split-FedLLM (cut 1)) |" in report and "| 10 (FedLLM LoRA, 10 clients) |" in report
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
    # whether a run checkpointed changes what it wrote, not what it measured
    assert same_config(recorded, build_config({"method": {"name": "lora"}, "output": {"checkpoint": False}}))
    # nor where it wrote it (a bench started with an absolute --output re-ran and overwrote every committed run)
    assert same_config(recorded, build_config({"method": {"name": "lora"}, "output": {"dir": "/elsewhere/runs"}}))


def test_a_run_whose_defaulted_settings_have_moved_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a LoRA run that left its rate to the method's recommended default
    from fedcustom.bench.reuse import same_settings
    from fedcustom.config import build_config
    from fedcustom.convergence import local_schedule, resolved_settings
    from fedcustom.methods import defaults, get_method

    cfg = build_config({"method": {"name": "lora"}})
    method = get_method("lora")
    recorded = resolved_settings(cfg, method, local_schedule(cfg, method))
    # Assert: the same defaults are the same run; older summaries without a key are compared on the rest
    assert same_settings(recorded, cfg) and same_settings(None, cfg)
    assert same_settings({k: v for k, v in recorded.items() if k != "scaffold_weights"}, cfg)
    # ... but once the recommended rate has moved, the config is the same and the run is not
    monkeypatch.setitem(defaults.CLASSIFICATION, "lora", defaults.Recommended(1e-3))
    assert not same_settings(recorded, cfg)


def test_runs_recorded_before_the_auto_scaffold_rule_are_reused_where_it_resolves_to_theirs() -> None:
    # Prepare: runs recorded before --scaffold-weights defaulted to auto (with uniform, or before the key existed)
    from fedcustom.bench.reuse import same_config
    from fedcustom.config import build_config

    def recorded(scaffold: bool, weights: str | None) -> dict:  # type: ignore[type-arg]
        config = build_config({"method": {"name": "lora"}, "federation": {"scaffold": scaffold}}).to_dict()
        config["federation"].pop("scaffold_weights")
        if weights is not None:
            config["federation"]["scaffold_weights"] = weights
        return config

    auto = lambda scaffold: build_config({"method": {"name": "lora"}, "federation": {"scaffold": scaffold}})  # noqa: E731
    # Assert: without SCAFFOLD the rule does nothing, so those runs are the same runs
    assert same_config(recorded(False, "uniform"), auto(False)) and same_config(recorded(False, None), auto(False))
    # with SCAFFOLD and every client each round, auto weighs by examples: not the run they ran ...
    assert not same_config(recorded(True, "uniform"), auto(True)) and not same_config(recorded(True, None), auto(True))
    # ... unless the config asks for their rule
    uniform = build_config({"method": {"name": "lora"}, "federation": {"scaffold": True, "scaffold_weights": "uniform"}})
    assert same_config(recorded(True, None), uniform) and same_config(recorded(True, "uniform"), uniform)


def test_two_spellings_of_one_data_file_are_the_same_config(tmp_path: Path, toy_csv: str, monkeypatch) -> None:
    from fedcustom.bench.reuse import same_config
    from fedcustom.config import build_config

    # Prepare: a run recorded with a relative path to the data, and another data file
    monkeypatch.chdir(Path(toy_csv).parent)
    recorded = build_config({"data": {"dataset": Path(toy_csv).name}}).to_dict()
    other = tmp_path / "other.csv"
    other.write_text(Path(toy_csv).read_text())
    # Assert: the same file spelled absolute is the same run; a copy elsewhere is not
    assert same_config(recorded, build_config({"data": {"dataset": str(Path(toy_csv).resolve())}}))
    assert not same_config(recorded, build_config({"data": {"dataset": str(other)}}))


def test_codecs_preset_reports_bytes_accuracy_and_the_target(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: the shipped codecs sweep on a tiny BERT and the toy corpus, full fine-tuning, three of its chains
    import tomllib

    from rich.console import Console

    from fedcustom.bench import run_sweep_bench
    from fedcustom.bench.sweep import SWEEPS_DIR, merge, parse_sweep

    raw = tomllib.loads((SWEEPS_DIR / "codecs.toml").read_text())
    raw["base"] = merge(raw["base"], {"model": {"name": tiny_bert, "max_length": 16},
                                      "data": {"dataset": toy_csv, "eval_dataset": toy_csv, "max_train_examples": 120},
                                      "federation": {"clients": 2, "rounds": 2}})
    raw["axis"]["method"] = [{"label": "full", "set": {"method": {"name": "full"}, "train": {"lr": 3e-3}}}]
    raw["axis"]["chain"] = [c for c in raw["axis"]["chain"] if c["label"] in ("raw", "gradualdiff",
                                                                              "delta_topk0.05_int8_zstd")]
    sweep = parse_sweep(raw, str(SWEEPS_DIR / "codecs.toml"))
    out = tmp_path / "codecs"
    out.mkdir()
    # Execute
    result = run_sweep_bench(sweep, "/", out, "fedcustom bench --preset codecs", Console(quiet=True))
    # Assert: raw is the reference, GradualDiff-Fed is lossless and smaller, top-k more than 10x smaller
    from fedcustom.bench.codecs import flat, rows

    table = {r["chain"]: r for r in rows(flat(result["stages"]["all"]))}
    assert table["raw fp32"]["up_reduction"] == 1.0 and table["raw fp32"]["delta_points"] == 0.0
    assert table["GradualDiff-Fed"]["up_reduction"] > 1.0 and table["GradualDiff-Fed"]["delta_points"] == 0.0
    assert table["delta,topk:0.05,int8,zstd"]["up_reduction"] > 10
    # MB to a target counts the rounds' measured bytes: GradualDiff's first download is the dense model, so a
    # target met in round 1 costs more than the mean round (which the report once multiplied by the round)
    from fedcustom.bench.codecs import mb_to_target

    gradual = next(r for r in flat(result["stages"]["all"]) if r["chain"] == "GradualDiff-Fed")
    first, second = gradual["bytes_per_round_all_clients"]
    assert first > second and mb_to_target(gradual, 0.0) == pytest.approx(first / 1e6)
    assert mb_to_target(gradual, 0.0) > (gradual["bytes_up_per_round"] + gradual["bytes_down_per_round"]) * 2 / 1e6
    assert result["targets"][0]["target"].startswith("full fine-tuning")
    report = (out / "report.md").read_text()
    assert "| full | GradualDiff-Fed |" in report and "Model `" + tiny_bert in report
    assert (out / "accuracy_vs_cumulative_mb.png").stat().st_size > 0
