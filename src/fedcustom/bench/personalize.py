"""Report of `fedcustom bench --preset personalize` (sweeps/personalize.toml): per personalization mode and split,
the mean and worst-10% client accuracy of the global model and of each client's own model on the clients'
held-out rows, the global test accuracy and MB per round; targets of issue 21; one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcustom.bench.sweep import Sweep, preamble

PLOT = "personalize_client_accuracy.png"
MB = 1e6
GAIN = 0.05  # target: personalized mean client accuracy >= global + 5 points at Dirichlet 0.1 ...
SKEWED = "dirichlet0.1"  # ... with the worst 10% not below the global model's


def rows(records: list[dict]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        s = r["summary"]
        out.append({"variant": r["labels"]["variant"], "split": r["labels"]["split"], "method": r["tags"]["method"],
                    "mode": r["tags"]["mode"], "test_accuracy": s["final_accuracy"],
                    "global_mean": s["client_accuracy_mean"], "global_worst10": s["client_accuracy_worst10"],
                    "personal_mean": s["client_accuracy_personal_mean"],
                    "personal_worst10": s["client_accuracy_personal_worst10"],
                    "personal_per_round": s["client_accuracy_personal_mean_per_round"],
                    "global_per_round": s["client_accuracy_mean_per_round"],
                    "mb_up": s["bytes_up_per_round"] / MB, "mb_down": s["bytes_down_per_round"] / MB,
                    "wall": s["wall_seconds"],
                    "simulated_s": s.get("simulated_seconds_total"), "client_flops": s.get("client_flops_per_round")})
    return out


def lengths_lines(table: list[dict]) -> list[str]:
    """Stage lengths: every client with all virtual tokens vs lengths adapted to its device."""
    part = [r for r in table if r["method"] == "prefix-lengths"]
    if not part:
        return []
    lines = ["", "## Prefix lengths on three device classes", "",
             "Prefix tuning, clients cycled over a server (compute 1, 4,096 MB), a phone (0.25, 1,024 MB) and an IoT "
             "board (0.05, 256 MB): every client with all 20 virtual tokens (fixed) vs 20, 5 and 1 tokens from each "
             "device's compute and memory (adaptive). Simulated time: each round lasts as long as its slowest device "
             "(measured training time / compute + bytes / bandwidth), so it carries the noise of measured wall time; "
             "client FLOPs are counted (attention included).", "",
             "| variant | global test accuracy | global mean client accuracy | worst 10% | simulated s (all rounds) | "
             "TFLOPs per client per round | MB up per client per round |", "|---|---|---|---|---|---|---|"]
    for r in part:
        simulated = f"{r['simulated_s']:.0f}" if r["simulated_s"] is not None else "-"
        flops = f"{r['client_flops'] / 1e12:.1f}" if r["client_flops"] else "-"
        lines.append(f"| {r['variant']} | {r['test_accuracy']:.3f} | {r['global_mean']:.3f} | "
                     f"{r['global_worst10']:.3f} | {simulated} | {flops} | {r['mb_up']:.3f} |")
    if len(part) == 2 and all(r["client_flops"] for r in part):
        fixed, adaptive = part
        flops_cut = 1 - adaptive["client_flops"] / fixed["client_flops"]
        time_cut = 1 - adaptive["simulated_s"] / fixed["simulated_s"]
        lines += ["", f"Adaptive lengths cut the clients' FLOPs per round by {100 * flops_cut:.1f}% (a prefix's "
                      f"tokens enter attention only) and the simulated time by {100 * time_cut:.1f}%, at "
                      f"{100 * (adaptive['test_accuracy'] - fixed['test_accuracy']):+.1f} points of global test "
                      f"accuracy."]
        if time_cut > 2 * flops_cut + 0.02:
            lines[-1] += (" The time cut is larger than the FLOPs explain: most of it is the noise of measured wall "
                          "time, not a saving.")
    return lines


def local_lines(table: list[dict]) -> list[str]:
    """Stage local: each client trained alone on its own rows (nothing shared) against the best personalization
    mode and FedAvg of the same method and split."""
    local = [r for r in table if r["mode"] == "local"]
    if not local:
        return []
    lines = ["## Against local-only training", "",
             "The local rows train each client's model on its own rows only (`--personalize local`: nothing leaves "
             "a client), for the same rounds and local epochs.", "",
             "| method | split | local-only own mean | worst 10% | FedAvg global mean | best personalization | own mean "
             "| worst 10% |", "|---|---|---|---|---|---|---|---|"]
    for r in local:
        base = _fedavg(table, r["method"], r["split"])
        modes = [m for m in table if m["method"] == r["method"] and m["split"] == r["split"] and m["mode"] != "local"]
        best = max(modes, key=lambda m: m["personal_mean"], default=None)
        fedavg = f"{base['global_mean']:.3f}" if base else "-"
        mode = f"{best['variant']} | {best['personal_mean']:.3f} | {best['personal_worst10']:.3f}" if best else "- | - | -"
        lines.append(f"| {r['method']} | {r['split']} | {r['personal_mean']:.3f} | {r['personal_worst10']:.3f} | "
                     f"{fedavg} | {mode} |")
    return lines + [""]


def _fedavg(table: list[dict], method: str, split: str) -> dict | None:
    """The method's plain FedAvg model on that split: the global scores of its finetune run (which trains exactly
    like FedAvg)."""
    return next((r for r in table if r["method"] == method and r["split"] == split
                 and r["mode"].startswith("finetune")), None)


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """Per method at Dirichlet 0.1: its best personalization mode against its FedAvg model on the clients' rows."""
    table, out = rows(records), []
    for method in dict.fromkeys(r["method"] for r in table if r["method"] != "prefix-lengths"):
        base = _fedavg(table, method, SKEWED)
        modes = [r for r in table if r["method"] == method and r["split"] == SKEWED and r["mode"] != "local"]
        if base is None or not modes:
            continue
        best = max(modes, key=lambda r: r["personal_mean"])
        met = best["personal_mean"] >= base["global_mean"] + GAIN and best["personal_worst10"] >= base["global_worst10"]
        out.append({"target": f"{method}: personalized mean client accuracy >= FedAvg + 5 points at Dirichlet 0.1, "
                              f"worst 10% not below FedAvg's",
                    "measured": f"{best['variant']} {best['personal_mean']:.3f} (worst 10% "
                                f"{best['personal_worst10']:.3f}) vs FedAvg {base['global_mean']:.3f} (worst 10% "
                                f"{base['global_worst10']:.3f})", "met": met})
    return out


def plot(table: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = list(dict.fromkeys(r["split"] for r in table))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        part = [r for r in table if r["split"] == split]
        x = np.arange(len(part))
        ax.bar(x - 0.2, [r["global_mean"] for r in part], 0.4, label="global model")
        ax.bar(x + 0.2, [r["personal_mean"] for r in part], 0.4, label="each client's own")
        ax.scatter(x + 0.2, [r["personal_worst10"] for r in part], color="black", marker="_", s=120,
                   label="own, worst 10%")
        ax.set_xticks(x, [r["variant"] for r in part], rotation=30, ha="right", fontsize=7)
        ax.set(ylim=(0, 1), ylabel="mean client accuracy (held-out rows)", title=f"AG News, {split}")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=150)
    plt.close(fig)


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    records = [r for stage in stages.values() for r in stage]
    table = rows(records)
    if table:
        plot(table, out)
    lines = [*preamble(sweep, result),
             "Client accuracy: each client's held-out rows (20% of its own), mean over the 10 clients and the mean of "
             "the lowest tenth (worst 10%). `global`: the federated model; `own`: each client's personalized model. "
             "The finetune rows' global columns are plain FedAvg (finetune changes only the evaluation).", "",
             "| variant | split | global mean | global worst 10% | own mean | own worst 10% | global test accuracy | "
             "MB up per client per round | MB down per client per round |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['variant']} | {r['split']} | {r['global_mean']:.3f} | {r['global_worst10']:.3f} | "
                     f"{r['personal_mean']:.3f} | {r['personal_worst10']:.3f} | {r['test_accuracy']:.3f} | "
                     f"{r['mb_up']:.3f} | {r['mb_down']:.3f} |")
    lines += ["", "Own-model mean client accuracy per round (round 0: before training):", ""]
    lines += [f"- {r['variant']}, {r['split']}: " + ", ".join(f"{a:.3f}" for a in r["personal_per_round"] if a is not None)
              for r in table]
    lines += ["", "## Targets", ""] + [f"- {t['target']}: {t['measured']} — {'met' if t['met'] else 'not met'}"
                                       for t in result["targets"]]
    lines += [] if not any(r["variant"].startswith("ranks-") for r in table) else [
              "", "The ranks-* rows: clients of LoRA rank 2, 4 and 8 (cycled) on a rank-8 adapter, merged by "
              "averaging the factors (fedavg), with A frozen (ffa), by their products factored back to each "
              "client's rank (svd, FlexLoRA) or by their products merged into the backbone each round (stack, "
              "FLoRA; its MB down is the dense adapted weights); their finetune:5 own-model columns add 5 local "
              "steps.", ""]
    lines += local_lines(table)
    lines += lengths_lines(table)
    if table:
        lines += ["", f"![client accuracy]({PLOT})"]
    return "\n".join(lines) + "\n"
