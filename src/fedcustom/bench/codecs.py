"""Report of `fedcustom bench --preset codecs` (sweeps/codecs.toml): raw weights vs GradualDiff-Fed vs compressed
codec chains.

For full fine-tuning and LoRA on SST-2 with MiniLM: MB per client per round in each direction, total MB (both
directions, all clients) until the global model first reaches a target accuracy, and final accuracy, per chain and
seed. The target is 98% of the raw run's final accuracy (same method, same seed).
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

from fedcustom.bench.plots import codecs_accuracy_vs_cumulative_mb
from fedcustom.bench.report import MB
from fedcustom.bench.sweep import Sweep, base_value, preamble

KEYS = ("final_accuracy", "accuracy_per_round", "bytes_up_per_round", "bytes_down_per_round", "bytes_up_total",
        "bytes_down_total", "bytes_per_round_all_clients", "trainable_bytes_fp32", "round_wall_seconds", "codec_up",
        "codec_down", "clients", "learning_rate", "wall_seconds")
TARGET_SHARE = 0.98
RAW = "raw fp32"
PLOT = "accuracy_vs_cumulative_mb.png"


def flat(records: list[dict]) -> list[dict[str, Any]]:
    """The sweep's records as one flat record per (method, chain, seed) run."""
    return [{"method": r["labels"]["method"], "chain": r["tags"]["title"], "seed": r["labels"]["seed"],
             "reused": r["reused"], **{k: r["summary"].get(k) for k in KEYS}} for r in records]


def cumulative_mb(record: dict[str, Any]) -> list[float]:
    """MB sent by the end of each round (index 0: before training, 0), both directions, all clients, as measured
    round by round: rounds differ (a delta chain's first download is the dense model, later ones are diffs), so
    the mean round times the round number would understate a target reached early."""
    per_round = record.get("bytes_per_round_all_clients")
    if per_round is None:
        raise ValueError(f"run {record.get('chain')} / seed {record.get('seed')} predates per-round byte counts "
                         "(bytes_per_round_all_clients); run it again")
    return [0.0, *itertools.accumulate(b / MB for b in per_round)]


def mb_to_target(record: dict[str, Any], target: float) -> float | None:
    """Both directions, all clients, until the first round at or above ``target``; None if never."""
    sent = cumulative_mb(record)
    for rnd, accuracy in enumerate(record["accuracy_per_round"][1:], 1):
        if accuracy >= target:
            return sent[rnd]
    return None


def rows(records: list[dict]) -> list[dict[str, Any]]:
    """One row per (method, chain) of the flat records: means over seeds, deltas paired with the raw run of the same
    seed."""
    raw = {(r["method"], r["seed"]): r for r in records if r["chain"] == RAW}
    out = []
    for method in dict.fromkeys(r["method"] for r in records):
        for label in dict.fromkeys(r["chain"] for r in records):
            runs = [r for r in records if r["method"] == method and r["chain"] == label]
            if not runs:
                continue
            # the comparisons with raw pair each run with raw's run of its seed; a seed whose raw run has not
            # finished (a sweep run in parts) is left out of them, and without any the row says n/a
            pairs = [(r, raw[(method, r["seed"])]) for r in runs if (method, r["seed"]) in raw]
            reached = [mb_to_target(r, TARGET_SHARE * b["final_accuracy"]) for r, b in pairs]
            paired = (lambda values: statistics.fmean(values) if pairs else None)  # noqa: E731
            out.append({
                "method": method, "chain": label, "codec": runs[0]["codec_up"],
                "accuracy": statistics.fmean(r["final_accuracy"] for r in runs),
                "delta_points": paired([100 * (r["final_accuracy"] - b["final_accuracy"]) for r, b in pairs]),
                "mb_up": statistics.fmean(r["bytes_up_per_round"] for r in runs) / MB,
                "mb_down": statistics.fmean(r["bytes_down_per_round"] for r in runs) / MB,
                "up_reduction": paired([b["bytes_up_per_round"] / r["bytes_up_per_round"] for r, b in pairs]),
                "mb_to_target": statistics.fmean(reached) if pairs and all(v is not None for v in reached) else None,
                "seeds": len(runs),
            })
    return out


def table(result_rows: list[dict]) -> str:
    head = ("| method | chain | accuracy % | vs raw (points) | MB up / client / round | MB down / client / round | "
            f"upload reduction vs raw | MB to {TARGET_SHARE:.0%} of raw accuracy (all clients, both ways) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result_rows:
        unpaired = r["delta_points"] is None
        target = "n/a" if unpaired else "not reached" if r["mb_to_target"] is None else f"{r['mb_to_target']:.1f}"
        delta = "n/a" if unpaired else f"{r['delta_points']:+.1f}"
        reduction = "n/a" if unpaired else f"{r['up_reduction']:.1f}x"
        lines.append(f"| {r['method']} | {r['chain']} | {100 * r['accuracy']:.1f} | {delta} "
                     f"| {r['mb_up']:.3f} | {r['mb_down']:.3f} | {reduction} | {target} |")
    return "\n".join(lines)


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """The sweep's targets (of its records): see :func:`row_targets`."""
    return row_targets(rows(flat(records)))


def row_targets(result_rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's target: >= 10x fewer upload bytes than raw fp32 for full fine-tuning at <= 0.5 points lost."""
    full = [r for r in result_rows if r["method"] == "full" and r["chain"] != RAW and r["delta_points"] is not None]
    meeting = [r for r in full if r["up_reduction"] >= 10 and r["delta_points"] >= -0.5]
    best = max(meeting or full, key=lambda r: (r in meeting, r["up_reduction"]), default=None)
    measured = "no chains ran" if best is None else (f"{best['chain']}: {best['up_reduction']:.1f}x fewer upload bytes, "
                                                     f"{best['delta_points']:+.1f} points")
    return [{"target": "full fine-tuning: >= 10x fewer uploaded bytes than raw fp32, <= 0.5 points lower accuracy",
             "measured": measured, "met": bool(meeting)}]


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md: setup, one row per (method, chain), the target and the plot."""
    records = flat([r for stage in stages.values() for r in stage])
    result_rows = rows(records)
    if records:
        codecs_accuracy_vs_cumulative_mb(records, cumulative_mb, out / PLOT)
    b = lambda key: base_value(sweep, key)  # noqa: E731
    rates = ", ".join(dict.fromkeys(f"{r['method']} {r['learning_rate']:g}" for r in records))
    seeds = ", ".join(map(str, dict.fromkeys(r["seed"] for r in records)))
    parts = [*preamble(sweep, result), "## Setup", "",
             f"- Model `{b('model.name')}`; SST-2: {b('data.max_train_examples')} training rows from "
             f"`{Path(b('data.dataset')).name}`, accuracy on the 872-row `{Path(b('data.eval_dataset')).name}`; IID over "
             f"{b('federation.clients')} clients (all sampled), {b('federation.rounds')} rounds of "
             f"{b('federation.local_epochs')} local epoch(s), batch {b('train.batch_size')}, AdamW; seeds {seeds}; "
             f"learning rates {rates} (from the `tune` preset).",
             "- Each chain is used in both directions (client to server and server to client). Bytes are the real "
             "encoded payloads, per client per round.",
             "- GradualDiff-Fed is `delta,zstd`: the paper's public description says only that the difference of the "
             "model weights is sent instead of the model; that the difference is taken bit-exactly and compressed "
             "losslessly (zstd) is our inference, since an uncompressed fp32 difference is exactly as large as the "
             "weights.", "", "## Results", "", table(result_rows), "", "## Target", "",
             "| target | measured | met |", "|---|---|---|",
             *[f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]], "",
             f"![accuracy vs cumulative MB]({PLOT})", "",
             "Per-round accuracies and bytes are in `results.json`; each run's round log and summary under `runs/`.", ""]
    return "\n".join(parts)
