"""The three benchmark figures, as PNGs sized for a paper column."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedcustom.bench.report import MB, label, select, variants


COLORS = {"full": "tab:red", "lora": "tab:blue", "prompt": "tab:green", "prefix": "tab:purple"}
LINESTYLES = ("-", "--", "-.", ":")


def _style(records: list[dict], method: str, lr: float) -> dict:
    """One colour per method (the same in every figure) and one line style per learning rate."""
    rates = sorted({r for m, r in variants(records) if m == method})
    many = len(variants(records)) > len({m for m, _ in variants(records)})
    return {"color": COLORS.get(method), "linestyle": LINESTYLES[rates.index(lr) % len(LINESTYLES)],
            "label": label(method, lr, many)}


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    """Legend outside the axes when it is long, so it never hides a curve; then save."""
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 4:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _curves(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of accuracy per round (index 0 = before training)."""
    per_seed = np.array([r["accuracy_per_round"] for r in records], dtype=float) * 100
    return per_seed.mean(axis=0), per_seed.std(axis=0)


def _runs_per_variant(records: list[dict], dataset: str, split: str) -> Iterator[tuple[str, float, list[dict]]]:
    """(method, learning rate, its runs over seeds) for every variant that ran on ``dataset``/``split``."""
    for method, lr in variants(records):
        runs = select(records, dataset=dataset, method=method, lr=lr, split=split)
        if runs:
            yield method, lr, runs


def accuracy_vs_round(records: list[dict], dataset: str, split: str, path: Path) -> None:
    """Mean test accuracy per round over seeds, with a ±1 std band."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method, lr, runs in _runs_per_variant(records, dataset, split):
        mean, std = _curves(runs)
        rounds = np.arange(len(mean))
        style = _style(records, method, lr)
        ax.plot(rounds, mean, marker="o", **style)
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.15, color=style["color"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round (0 = before training)", ylabel="test accuracy (%)", title=f"{dataset}, {split}")
    _finish(fig, ax, path)


def accuracy_vs_megabytes(records: list[dict], dataset: str, split: str, path: Path) -> None:
    """Accuracy against cumulative MB one client sent and received (up + down)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method, lr, runs in _runs_per_variant(records, dataset, split):
        mean, _ = _curves(runs)
        per_round = np.mean([(r["bytes_up_per_round"] + r["bytes_down_per_round"]) / MB for r in runs])
        ax.plot(np.arange(len(mean)) * per_round, mean, marker="o", **_style(records, method, lr))
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="cumulative MB per client (up + down)", ylabel="test accuracy (%)", title=f"{dataset}, {split}")
    _finish(fig, ax, path)


def accuracy_vs_alpha(records: list[dict], dataset: str, splits: tuple[str, ...], path: Path) -> None:
    """Final accuracy per split, from IID (left) to the most skewed Dirichlet alpha (right)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    names = ["IID" if s == "iid" else "α=" + s.split(":", 1)[1] for s in splits]
    for method, lr in variants(records):
        means, stds = [], []
        for split in splits:
            acc = np.array([r["final_accuracy"] for r in select(records, dataset=dataset, method=method, lr=lr, split=split)])
            means.append(acc.mean() * 100)
            stds.append(acc.std() * 100)
        ax.errorbar(range(len(splits)), means, yerr=stds, marker="o", capsize=3, **_style(records, method, lr))
    ax.set_xticks(range(len(splits)), names)
    ax.set(xlabel="label split (Dirichlet α; smaller = more skewed)", ylabel="test accuracy (%)", title=dataset)
    _finish(fig, ax, path)


FAMILY_COLORS = {"FedLLM": "tab:blue", "KD-FedLLM": "tab:orange", "Split-FedLLM": "tab:green"}


def frameworks_accuracy_vs_mb(records: list[dict], path: Path) -> None:
    """Final accuracy against MB per client per round (up + down, log scale), one colour per framework."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, color in FAMILY_COLORS.items():
        runs = [r for r in records if r["family"] == family]
        if runs:
            mb = [(r["bytes_up_per_round"] + r["bytes_down_per_round"]) / MB for r in runs]
            ax.scatter(mb, [100 * r["final_accuracy"] for r in runs], color=color, label=family)
            for x, r in zip(mb, runs):
                ax.annotate(r["key"], (x, 100 * r["final_accuracy"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("MB per client per round (up + down)")
    ax.set_ylabel("final accuracy (%)")
    _finish(fig, ax, path)


def frameworks_flops(records: list[dict], path: Path) -> None:
    """Client and server GFLOPs per client per round, side by side for each run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(records))
    client = [(r["client_flops_per_round"] or 0) / 1e9 for r in records]  # None: not measured
    server = [(r["server_flops_per_round"] or 0) / 1e9 for r in records]
    ax.bar(x - 0.2, client, 0.4, label="client", color="tab:blue")
    ax.bar(x + 0.2, server, 0.4, label="server (per client)", color="tab:gray")
    ax.set_xticks(x, [r["key"] for r in records], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("GFLOPs per client per round")
    _finish(fig, ax, path)


def codecs_accuracy_vs_cumulative_mb(records: list[dict], cumulative_mb: Callable[[dict], list[float]],
                                     path: Path) -> None:
    """Accuracy per round against MB sent so far (both directions, all clients; ``cumulative_mb`` of a record),
    one line per chain."""
    methods = sorted({r["method"] for r in records})
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for i, r in enumerate(x for x in records if x["method"] == method and x["seed"] == records[0]["seed"]):
            mb = cumulative_mb(r)
            ax.plot(mb[1:], [100 * a for a in r["accuracy_per_round"][1:]], marker="o", markersize=3,
                    linestyle=LINESTYLES[i % len(LINESTYLES)], label=r["chain"])
        ax.set_xscale("log")
        ax.set_title(method)
        ax.set_xlabel("cumulative MB (all clients, both directions)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
