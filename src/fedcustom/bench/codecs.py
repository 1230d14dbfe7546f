"""`fedcustom bench --preset codecs`: raw weights vs GradualDiff-Fed vs compressed codec chains.

For full fine-tuning and LoRA on SST-2 with MiniLM: MB per client per round in each direction,
total MB (both directions, all clients) until the global model first reaches a target accuracy, and
final accuracy, per chain and seed. The target is 98% of the raw run's final accuracy (same method,
same seed).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedcustom.bench.report import MB, machine_line
from fedcustom.bench.reuse import run_or_reuse
from fedcustom.bench.settings import Sst2Setting
from fedcustom.config import RunConfig
from fedcustom.errors import FedCustomError

KEYS = ("final_accuracy", "accuracy_per_round", "bytes_up_per_round", "bytes_down_per_round", "bytes_up_total",
        "bytes_down_total", "trainable_bytes_fp32", "round_wall_seconds", "codec_up", "codec_down")
TARGET_SHARE = 0.98


@dataclass(frozen=True)
class CodecSetting(Sst2Setting):
    """The shared SST-2 budget (the `paper` preset's, more rounds), the seeds and the methods compared."""

    seeds: tuple[int, ...] = (0,)
    methods: tuple[tuple[str, float], ...] = (("full", 1e-4), ("lora", 3e-3))  # rates from the `tune` preset


CHAINS: dict[str, str] = {  # label -> chain, used in both directions
    "raw fp32": "raw",
    "GradualDiff-Fed": "gradualdiff",
    "delta,int8,zstd": "delta,int8,zstd",
    "delta,int4,zstd": "delta,int4,zstd",
    "delta,topk:0.05,int8,zstd": "delta,topk:0.05,int8,zstd",
    "delta,topk:0.01,int8,zstd": "delta,topk:0.01,int8,zstd",
}


def run_config(s: CodecSetting, method: str, lr: float, chain: str, seed: int, data_dir: Path, out: Path) -> RunConfig:
    key = chain.replace(",", "_").replace(":", "")
    return s.run_config(data_dir, out / "runs" / method / key / f"seed{seed}", {"name": method}, lr, seed,
                        codec={"up": chain, "down": chain})


def run_codecs(data_dir: Path, out: Path, console: Console, setting: CodecSetting = CodecSetting(),
               chains: dict[str, str] = CHAINS) -> list[dict[str, Any]]:
    """Every (method, chain, seed) run, reusing finished ones with the same config."""
    for rel in (setting.train, setting.eval):
        if not (data_dir / rel).is_file():
            raise FedCustomError(f"benchmark data {data_dir / rel}: not found; expected the shared data folder")
    records, todo = [], [(m, lr, label, seed) for m, lr in setting.methods for label in chains for seed in setting.seeds]
    for i, (method, lr, label, seed) in enumerate(todo, 1):
        cfg = run_config(setting, method, lr, chains[label], seed, data_dir, out)
        start = time.perf_counter()
        summary, reused = run_or_reuse(cfg)
        records.append({"method": method, "chain": label, "seed": seed, "reused": reused,
                        **{k: summary.get(k) for k in KEYS}, "wall_seconds": summary.get("wall_seconds")})
        console.print(f"[{i}/{len(todo)}] {method} {label} seed {seed}: accuracy {summary['final_accuracy']:.4f} "
                      f"({time.perf_counter() - start:.0f} s)")
    return records


def mb_to_target(record: dict[str, Any], target: float, clients: int) -> float | None:
    """Both directions, all clients, until the first round at or above ``target``; None if never."""
    per_round = (record["bytes_up_per_round"] + record["bytes_down_per_round"]) * clients / MB
    for rnd, accuracy in enumerate(record["accuracy_per_round"][1:], 1):
        if accuracy >= target:
            return per_round * rnd
    return None


def rows(records: list[dict], setting: CodecSetting) -> list[dict[str, Any]]:
    """One row per (method, chain): means over seeds, deltas paired with the raw run of the same seed."""
    raw = {(r["method"], r["seed"]): r for r in records if r["chain"] == "raw fp32"}
    out = []
    for method, _ in setting.methods:
        for label in dict.fromkeys(r["chain"] for r in records):
            runs = [r for r in records if r["method"] == method and r["chain"] == label]
            if not runs:
                continue
            base = [raw[(method, r["seed"])] for r in runs]
            reached = [mb_to_target(r, TARGET_SHARE * b["final_accuracy"], setting.clients) for r, b in zip(runs, base)]
            out.append({
                "method": method, "chain": label, "codec": runs[0]["codec_up"],
                "accuracy": statistics.fmean(r["final_accuracy"] for r in runs),
                "delta_points": statistics.fmean(100 * (r["final_accuracy"] - b["final_accuracy"]) for r, b in zip(runs, base)),
                "mb_up": statistics.fmean(r["bytes_up_per_round"] for r in runs) / MB,
                "mb_down": statistics.fmean(r["bytes_down_per_round"] for r in runs) / MB,
                "up_reduction": statistics.fmean(b["bytes_up_per_round"] / r["bytes_up_per_round"] for r, b in zip(runs, base)),
                "mb_to_target": statistics.fmean(reached) if all(v is not None for v in reached) else None,
                "seeds": len(runs),
            })
    return out


def table(result_rows: list[dict]) -> str:
    head = ("| method | chain | accuracy % | vs raw (points) | MB up / client / round | MB down / client / round | "
            "upload reduction vs raw | MB to 98% of raw accuracy (all clients, both ways) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result_rows:
        target = "not reached" if r["mb_to_target"] is None else f"{r['mb_to_target']:.1f}"
        lines.append(f"| {r['method']} | {r['chain']} | {100 * r['accuracy']:.1f} | {r['delta_points']:+.1f} "
                     f"| {r['mb_up']:.3f} | {r['mb_down']:.3f} | {r['up_reduction']:.1f}x | {target} |")
    return "\n".join(lines)


def targets(result_rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's target: >= 10x fewer upload bytes than raw fp32 for full fine-tuning at <= 0.5 points lost."""
    full = [r for r in result_rows if r["method"] == "full" and r["chain"] != "raw fp32"]
    meeting = [r for r in full if r["up_reduction"] >= 10 and r["delta_points"] >= -0.5]
    best = max(meeting or full, key=lambda r: (r in meeting, r["up_reduction"]), default=None)
    measured = "no chains ran" if best is None else (f"{best['chain']}: {best['up_reduction']:.1f}x fewer upload bytes, "
                                                     f"{best['delta_points']:+.1f} points")
    return [{"target": "full fine-tuning: >= 10x fewer uploaded bytes than raw fp32, <= 0.5 points lower accuracy",
             "measured": measured, "met": bool(meeting)}]


def report(result_rows: list[dict], setting: CodecSetting, command: str, machine: dict[str, Any], wall: float,
           runs: int) -> str:
    s = setting
    met = targets(result_rows)
    parts = ["# fedcustom bench — preset `codecs`", "",
             "Raw fp32 weights vs GradualDiff-Fed (arXiv 2506.19164) vs compressed codec chains, in both directions.",
             "", f"Command: `{command}`  ", f"Machine: {machine_line(machine)}; "
             f"{runs} runs, this invocation {wall / 60:.1f} min.", "", "## Setup", "",
             f"- Model `{s.model}`; SST-2: {s.max_train} training rows from `{s.train}`, accuracy on the 872-row "
             f"`{s.eval}`; IID over {s.clients} clients (all sampled), {s.rounds} rounds of {s.local_epochs} local "
             f"epoch(s), batch {s.batch_size}, AdamW; seeds {', '.join(map(str, s.seeds))}; learning rates "
             + ", ".join(f"{m} {lr:g}" for m, lr in s.methods) + " (from the `tune` preset).",
             "- Each chain is used in both directions (client to server and server to client). Bytes are the real "
             "encoded payloads, per client per round.",
             "- GradualDiff-Fed is `delta,zstd`: the paper's public description says only that the difference of the "
             "model weights is sent instead of the model; that the difference is taken bit-exactly and compressed "
             "losslessly (zstd) is our inference, since an uncompressed fp32 difference is exactly as large as the "
             "weights.", "", "## Results", "", table(result_rows), "", "## Target", "",
             "| target | measured | met |", "|---|---|---|",
             *[f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in met], "",
             "![accuracy vs cumulative MB](accuracy_vs_cumulative_mb.png)", "",
             "Per-round accuracies and bytes are in `results.json`; each run's round log and summary under `runs/`.", ""]
    return "\n".join(parts)
