"""Report of `fedcustom bench --preset vision` (sweeps/vision.toml): per method and split, federated vs centralized
accuracy at the same example passes, MB per round and client FLOPs, and one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcustom.bench.sweep import Sweep, preamble

PLOT = "vision_accuracy.png"
MB = 1e6


def rows(records: list[dict]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        s = r["summary"]
        central = s.get("centralized_accuracy")
        out.append({"method": r["labels"]["method"], "split": r["labels"]["split"], "accuracy": s["final_accuracy"],
                    "centralized": central, "gap": None if central is None else 100 * (s["final_accuracy"] - central),
                    "mb_up": s["bytes_up_per_round"] / MB, "mb_down": s["bytes_down_per_round"] / MB,
                    "gflops": (s.get("client_flops_per_round") or 0) / 1e9, "trainable": s["trainable_params"],
                    "per_round": s["accuracy_per_round"], "wall": s["wall_seconds"]})
    return out


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """What the vision case is expected to show: every method learns far above chance (0.1) on both splits."""
    result = rows(records)
    if not result:
        return []
    worst = min(result, key=lambda r: r["accuracy"])
    return [{"target": "every method above 0.5 accuracy (chance: 0.1) on IID and Dirichlet 0.1",
             "measured": f"lowest {worst['accuracy']:.3f} ({worst['method']}, {worst['split']})",
             "met": worst["accuracy"] > 0.5}]


def plot(result: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in result))
    splits = list(dict.fromkeys(r["split"] for r in result))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / (2 * len(splits))
    for j, split in enumerate(splits):
        by = {r["method"]: r for r in result if r["split"] == split}
        x = np.arange(len(methods)) + (2 * j - len(splits) + 0.5) * width
        ax.bar(x, [by[m]["accuracy"] if m in by else 0 for m in methods], width, label=f"federated, {split}")
        ax.bar(x + width, [by[m]["centralized"] or 0 if m in by else 0 for m in methods], width, alpha=0.45,
               label=f"centralized, {split} rows")
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="EfficientNet-Lite0 on Fashion-MNIST")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=150)
    plt.close(fig)


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    records = stages.get("report", [])
    table = rows(records)
    if table:
        plot(table, out)
    lines = [*preamble(sweep, result),
             "| method | split | federated accuracy | centralized (same passes) | gap (points) | MB up / down per "
             "client per round | client GFLOPs per round | trainable parameters |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        central = "-" if r["centralized"] is None else f"{r['centralized']:.3f}"
        gap = "-" if r["gap"] is None else f"{r['gap']:+.1f}"
        lines.append(f"| {r['method']} | {r['split']} | {r['accuracy']:.3f} | {central} | {gap} | "
                     f"{r['mb_up']:.2f} / {r['mb_down']:.2f} | {r['gflops']:.1f} | {r['trainable']:,} |")
    lines += ["", "Accuracy per round (round 0: the new head on the pretrained backbone):", ""]
    lines += [f"- {r['method']}, {r['split']}: " + ", ".join(f"{a:.3f}" for a in r["per_round"]) for r in table]
    lines += ["", "## Targets", ""] + [f"- {t['target']}: {t['measured']} — {'met' if t['met'] else 'not met'}"
                                       for t in result["targets"]]
    if table:
        lines += ["", f"![accuracy]({PLOT})"]
    return "\n".join(lines) + "\n"
