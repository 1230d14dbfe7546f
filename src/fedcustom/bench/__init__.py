"""`fedcustom bench`: run a preset's grid and write report.md, results.json and the plots."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcustom.bench import codecs, generative, robust
from fedcustom.bench.frameworks import VARIANTS, Setting, Variant, all_runs, report, run_frameworks, table
from fedcustom.bench.grid import cells, run_grid
from fedcustom.bench.plots import (accuracy_vs_alpha, accuracy_vs_megabytes, accuracy_vs_round, codecs_accuracy_vs_cumulative_mb,
                                   frameworks_accuracy_vs_mb, frameworks_flops)
from fedcustom.bench.presets import PRESETS, BenchPreset, get_preset
from fedcustom.errors import ConfigError
from fedcustom.bench.sweep import Sweep, as_json, load_sweep, merge, run_sweep, sweep_names
from fedcustom.bench.report import (best_rates, build_rows, diagnostics, machine, machine_line, main_table, paper_table,
                                    skew_dataset, skew_table, targets, variants)
from fedcustom.assemble import prepare_output
from fedcustom.report import write_json
from fedcustom.summary import versions

__all__ = ["PRESETS", "get_preset", "run_bench"]

PLOTS = {"accuracy_vs_round": "accuracy_vs_round.png", "accuracy_vs_mb": "accuracy_vs_mb.png",
         "accuracy_vs_alpha": "accuracy_vs_alpha.png"}


def _setup_lines(preset: BenchPreset) -> list[str]:
    backbone = " (packaged all-MiniLM-L6-v2 encoder)" if preset.model == "minilm" else ""
    lines = [f"- Model: `{preset.model}`{backbone}; {preset.clients} clients, all sampled "
             f"every round; {preset.rounds} rounds of {preset.local_epochs} local epoch(s); batch {preset.batch_size}; "
             f"AdamW; seeds {', '.join(map(str, preset.seeds))}.",
             f"- Methods: prompt/prefix with {preset.num_virtual_tokens} virtual tokens, LoRA rank {preset.lora_r}; "
             "learning rates " + ", ".join(f"{m} {'/'.join(f'{lr:g}' for lr in preset.lrs[m])}" for m in preset.methods)
             + " (see `fedcustom/bench/presets.py` for how they were chosen).",
             "- Centralized baseline: same model, method, optimizer and learning rate, trained on the union of the "
             "clients' rows for the same number of example passes as the federated run."]
    for ds in preset.datasets:
        lines.append(f"- {ds.title}: {ds.max_train} training rows, {ds.max_eval or 'all'} evaluation rows, "
                     f"max {ds.max_length} tokens, splits {', '.join(ds.splits)}. {ds.note}")
    lines += [f"- {note}" for note in preset.notes]
    return lines


def write_report(out: Path, preset: BenchPreset, rows: list[dict], result: dict[str, Any]) -> None:
    many = len(variants(result["cells"])) > len(preset.methods)
    main = preset.datasets[0]
    parts = [f"# fedcustom bench — preset `{preset.name}`", "", preset.description, "",
             f"Command: `{result['command']}`  ", f"Machine: {machine_line(result['machine'])}; "
             f"the {len(result['cells'])} runs took {result['cells_wall_seconds'] / 60:.1f} min in all "
             f"({result['reused_cells']} reused from an earlier invocation of the same command; this invocation "
             f"{result['wall_seconds'] / 60:.1f} min); finished {result['finished']}.", "",
             "## Setup", "", *_setup_lines(preset), "",
             f"## Results ({main.title}, {main.splits[0]}; mean ± std over {len(preset.seeds)} seed(s))", "",
             "Accuracy is the final global model's; the gap is federated minus centralized, paired by seed. Bytes are "
             "the encoded payload per client per round (trainable tensors incl. the classification head). Client "
             "FLOPs are counted with torch's FlopCounterMode; × backbone forward is one training step's FLOPs over "
             "one forward pass of the frozen backbone on the same batch.", "", main_table(rows, many), ""]
    skew = skew_dataset(preset)
    if skew:
        parts += [f"## Label skew ({next(d.title for d in preset.datasets if d.key == skew)})", "",
                  skew_table(rows, many), "", f"![accuracy vs alpha]({PLOTS['accuracy_vs_alpha']})", ""]
    if many:
        chosen = best_rates(rows)
        parts += ["## Selected learning rates", "", "The rate with the highest final accuracy per method:", "",
                  *[f"- {m}: {lr:g}" for m, lr in chosen.items()], ""]
    if not many:
        parts += ["## Against the paper (arXiv 2601.00526; uploads from FedPETuning, ACL 2023)", "",
                  "The paper's communication column is for a much larger model; compare ratios between methods, "
                  "not absolute sizes.", "", paper_table(rows), ""]
    parts += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    parts += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    if any(not t["met"] for t in result["targets"]):
        parts += ["", "### What the measurements say about the misses", "", *diagnostics(result["cells"], preset)]
    parts += ["", "## Plots", "", f"![accuracy vs round]({PLOTS['accuracy_vs_round']})",
              f"![accuracy vs MB]({PLOTS['accuracy_vs_mb']})", "",
              "Every number, per seed and per round, is in `results.json`; each run's round log and summary are "
              "under `runs/`.", ""]
    (out / "report.md").write_text("\n".join(parts))


def run_bench(preset_name: str, data_dir: str, output: str, command: str, console: Console | None = None,
              stages: list[str] | None = None, jobs: int = 1, model: str | None = None) -> dict[str, Any]:
    """Run the preset's grid, then write results.json, report.md and the PNG plots into ``output``. ``model``
    replaces the backbone of a grid preset (quick, paper, tune) or a sweep's base config."""
    is_sweep = preset_name in sweep_names() or preset_name.endswith(".toml")
    if model is not None and not is_sweep and preset_name not in PRESETS:
        raise ConfigError(f"bench --model: preset {preset_name!r} fixes its own models; --model applies to "
                          f"{', '.join(PRESETS)} and the sweep presets ({', '.join(sweep_names())}, or a .toml file)")
    out = prepare_output(output)
    console = console or Console()
    if is_sweep:
        sweep = load_sweep(preset_name)
        if model is not None:
            sweep = dataclasses.replace(sweep, base=merge(sweep.base, {"model": {"name": model}}))
        return run_sweep_bench(sweep, data_dir, out, command, console, stages, jobs)
    if preset_name == "frameworks":
        return run_frameworks_bench(data_dir, out, command, console)
    if preset_name == "codecs":
        return run_codecs_bench(data_dir, out, command, console)
    if preset_name == "robust":
        return run_robust_bench(data_dir, out, command, console)
    if preset_name == "leakage":
        from fedcustom.bench.leakage import run_leakage_bench

        return run_leakage_bench(data_dir, out, command, console, stages)
    if preset_name == "generative":  # packaged model and data: data_dir is not used
        return run_generative_bench(out, command, console)
    preset = get_preset(preset_name)
    if model is not None:
        preset = dataclasses.replace(preset, model=model)
    start = time.perf_counter()
    console.print(f"bench preset {preset.name!r}: {len(cells(preset))} federated runs -> {out}")
    records = run_grid(preset, Path(data_dir).expanduser(), out, console)
    rows = build_rows(records, preset)
    result = {
        "preset": preset.name, "command": command, "versions": versions(), "machine": machine(),
        "wall_seconds": time.perf_counter() - start,
        "cells_wall_seconds": sum(r["wall_seconds"] or 0.0 for r in records),  # incl. reused cells' original runs
        "reused_cells": sum(bool(r.get("reused")) for r in records),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows, "cells": records,
    }
    result["targets"] = targets(rows)
    main = preset.datasets[0]
    accuracy_vs_round(records, main.key, main.splits[0], out / PLOTS["accuracy_vs_round"])
    accuracy_vs_megabytes(records, main.key, main.splits[0], out / PLOTS["accuracy_vs_mb"])
    skew = skew_dataset(preset)
    if skew:
        splits = next(d.splits for d in preset.datasets if d.key == skew)
        accuracy_vs_alpha(records, skew, splits, out / PLOTS["accuracy_vs_alpha"])
    write_json(out / "results.json", result)
    write_report(out, preset, rows, result)
    console.print(main_table(rows, len(variants(records)) > len(preset.methods)), soft_wrap=True)
    console.print(f"report: {out / 'report.md'}")
    return result


def run_frameworks_bench(data_dir: str, out: Path, command: str, console: Console,
                         setting: Setting = Setting(), variants: tuple[Variant, ...] = VARIANTS) -> dict[str, Any]:
    """FedLLM vs KD-FedLLM vs Split-FedLLM (bench/frameworks.py): results.json, report.md, two plots."""
    start = time.perf_counter()
    console.print(f"bench preset 'frameworks': {len(all_runs(variants))} federated runs -> {out}")
    records = run_frameworks(Path(data_dir).expanduser(), out, console, setting, variants)
    wall = time.perf_counter() - start
    result = {"preset": "frameworks", "command": command, "versions": versions(), "machine": machine(),
              "wall_seconds": wall, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "setting": dataclasses.asdict(setting), "runs": records}
    frameworks_accuracy_vs_mb(records, out / "accuracy_vs_mb.png")
    frameworks_flops(records, out / "flops.png")
    write_json(out / "results.json", result)
    (out / "report.md").write_text(report(records, setting, command, result["machine"], wall))
    console.print(table(records, "base", "framework"), soft_wrap=True)
    console.print(f"report: {out / 'report.md'}")
    return result


def run_codecs_bench(data_dir: str, out: Path, command: str, console: Console,
                     setting: codecs.CodecSetting = codecs.CodecSetting(),
                     chains: dict[str, str] = codecs.CHAINS) -> dict[str, Any]:
    """Raw vs GradualDiff-Fed vs codec chains (bench/codecs.py): results.json, report.md, one plot."""
    start = time.perf_counter()
    records = codecs.run_codecs(Path(data_dir).expanduser(), out, console, setting, chains)
    wall = time.perf_counter() - start
    rows = codecs.rows(records, setting)
    result = {"preset": "codecs", "command": command, "versions": versions(), "machine": machine(),
              "wall_seconds": wall, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "setting": dataclasses.asdict(setting), "rows": rows, "targets": codecs.targets(rows), "runs": records}
    codecs_accuracy_vs_cumulative_mb(records, setting.clients, out / "accuracy_vs_cumulative_mb.png")
    write_json(out / "results.json", result)
    (out / "report.md").write_text(codecs.report(rows, setting, command, result["machine"], wall, len(records)))
    console.print(codecs.table(rows), soft_wrap=True)
    console.print(f"report: {out / 'report.md'}")
    return result


def run_robust_bench(data_dir: str, out: Path, command: str, console: Console,
                     setting: robust.RobustSetting = robust.RobustSetting()) -> dict[str, Any]:
    """FedAvg vs robust strategies under 0/10/30% attackers (bench/robust.py): results.json, report.md, one plot."""
    start = time.perf_counter()
    records = robust.run_robust(Path(data_dir).expanduser(), out, console, setting)
    wall = time.perf_counter() - start
    rows, norms = robust.rows(records), robust.norm_stats(records, setting)
    result = {"preset": "robust", "command": command, "versions": versions(), "machine": machine(),
              "wall_seconds": wall, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "setting": dataclasses.asdict(setting), "rows": rows, "norm_bound": norms, "runs": records}
    robust.plot_accuracy_vs_attackers(rows, out / robust.PLOT)
    write_json(out / "results.json", result)
    (out / "report.md").write_text(robust.report(rows, norms, setting, command, result["machine"], wall, records))
    console.print(robust.accuracy_table(rows), soft_wrap=True)
    console.print(f"report: {out / 'report.md'}")
    return result


def run_generative_bench(out: Path, command: str, console: Console,
                         setting: generative.GenerativeSetting = generative.GenerativeSetting()) -> dict[str, Any]:
    """Full, LoRA, prompt, prefix, split and KD tuning of a causal LM vs their centralized baselines (bench/generative.py):
    results.json, report.md, one plot."""
    start = time.perf_counter()
    records = generative.run_generative(out, console, setting)
    wall = time.perf_counter() - start
    rows = generative.rows(records)
    result = {"preset": "generative", "command": command, "versions": versions(), "machine": machine(),
              "wall_seconds": wall, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "setting": dataclasses.asdict(setting), "rows": rows, "runs": records}
    generative.plot_perplexity_vs_round(records, out / generative.PLOT)
    write_json(out / "results.json", result)
    (out / "report.md").write_text(generative.report(rows, setting, command, result["machine"], wall, records))
    console.print(generative.table(rows), soft_wrap=True)
    console.print(f"report: {out / 'report.md'}")
    return result


def run_sweep_bench(sweep: Sweep, data_dir: str, out: Path, command: str, console: Console,
                    stages: list[str] | None = None, jobs: int = 1) -> dict[str, Any]:
    """A declarative sweep (fedcustom/bench/sweeps/*.toml): its stages' runs, then results.json and the report its
    ``report`` module writes (with its plots)."""
    import importlib

    start = time.perf_counter()
    records = run_sweep(sweep, Path(data_dir).expanduser(), out, console, stages, jobs)
    runs = [r for stage in records.values() for r in stage]
    writer = importlib.import_module(f"fedcustom.bench.{sweep.report}")
    result = {"preset": sweep.name, "command": command, "versions": versions(), "machine": machine(),
              "wall_seconds": time.perf_counter() - start, "runs": len(runs),
              "reused": sum(r["reused"] for r in runs),
              "cells_wall_seconds": sum(r["summary"].get("wall_seconds") or 0.0 for r in runs),
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "sweep": as_json(sweep), "targets": writer.targets(records.get("report", runs)), "stages": records}
    write_json(out / "results.json", result)
    (out / "report.md").write_text(writer.report(sweep, records, result, out))
    console.print(f"report: {out / 'report.md'}")
    return result
