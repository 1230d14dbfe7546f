"""Report of `fedcustom bench --preset robust` (sweeps/robust.toml): accuracy under 0%, 10% and 30% attackers,
FedAvg vs robust strategies.

For prefix tuning and LoRA on SST-2 with MiniLM, every strategy of fedcustom.strategies.robust
(coordinate-wise median and trimmed mean, Yin et al. ICML 2018; Multi-Krum, Blanchard et al.
NeurIPS 2017; norm bounding, Sun et al. arXiv:1911.07963) against FedAvg, while a fixed share of
the clients sends a scaled sign-flipped update (-SCALE x its honest update; the model-poisoning
attack that Blanchard et al. show breaks any linear merge such as FedAvg). The attackers are fixed
by the seed, so every strategy faces the same clients. Each run also records the L2 norm of every
update the server received (:func:`instrument`), which is how norm bounding's C was chosen.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import torch

from fedcustom.bench.sweep import Sweep, base_value, preamble
from fedcustom.report import write_json
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.strategies.robust import global_norm

KEYS = ("final_accuracy", "accuracy_per_round", "malicious_clients", "attack", "attack_scale", "rejected_updates",
        "wall_seconds", "learning_rate")
NORMS_FILE = "update_norms.json"
PLOT = "accuracy_vs_attackers.png"


class NormRecorder:
    """Wraps a strategy and records, per round, the L2 norm of every update it merges (all float tensors)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner, self.name = inner, inner.name
        self.rounds: list[dict[str, float]] = []  # per round: node id -> norm of (client state - global state)

    def accumulator(self, global_state: dict[str, torch.Tensor] | None = None) -> None:
        return None  # the norms need every update

    def aggregate(self, global_state: dict[str, torch.Tensor], updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        names = [n for n, t in global_state.items() if t.is_floating_point()]
        self.rounds.append({str(u.node_id): global_norm([u.state[n] - global_state[n] for n in names])
                            for u in updates})
        return self.inner.aggregate(global_state, updates)


def instrument(job: Any, folder: Path) -> Callable[[dict[str, Any]], None]:
    """Record the norm of every update the server merges; written to the run folder's update_norms.json."""
    recorder = NormRecorder(job.server.strategy)
    job.server.strategy = recorder
    return lambda _summary: write_json(folder / NORMS_FILE, recorder.rounds)


def complete(folder: Path, summary: dict[str, Any]) -> bool:
    """A finished run counts only with its update norms."""
    return (folder / NORMS_FILE).is_file()


def flat(records: list[dict], runs_dir: Path) -> list[dict[str, Any]]:
    """The sweep's records as one flat record per (method, strategy, attacker share) run, with its update norms
    (from ``runs_dir``, the sweep output's runs/ folder)."""
    return [{"method": r["labels"]["method"], "strategy": r["tags"]["strategy_name"],
             "strategy_spec": r["summary"]["strategy"], "fraction": r["tags"]["attacker_share"], "reused": r["reused"],
             **{k: r["summary"].get(k) for k in KEYS},
             "update_norms": json.loads((runs_dir / r["run_dir"] / NORMS_FILE).read_text())} for r in records]


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """The robust comparison states no target: it measures."""
    return []


def rows(records: list[dict]) -> list[dict[str, Any]]:
    """One row per run: accuracy, and points lost against the same strategy and against FedAvg without attackers."""
    clean = {(r["method"], r["strategy"]): r["final_accuracy"] for r in records if r["fraction"] == 0.0}
    out = []
    for r in records:
        own, fedavg = clean.get((r["method"], r["strategy"])), clean.get((r["method"], "fedavg"))
        out.append({
            "method": r["method"], "strategy": r["strategy"], "strategy_spec": r["strategy_spec"],
            "fraction": r["fraction"], "malicious_clients": r["malicious_clients"], "accuracy": r["final_accuracy"],
            "drop_vs_same_strategy_clean": None if own is None else 100 * (own - r["final_accuracy"]),
            "drop_vs_fedavg_clean": None if fedavg is None else 100 * (fedavg - r["final_accuracy"]),
        })
    return out


def _grid(result_rows: list[dict], cell) -> str:
    """Methods x strategies, one column per attacker share; ``cell`` formats one row."""
    fractions = list(dict.fromkeys(r["fraction"] for r in result_rows))
    head = "| method | strategy | " + " | ".join(f"{round(100 * f)}% attackers" for f in fractions) + " |"
    lines = [head, "|" + "---|" * (2 + len(fractions))]
    for method, label in dict.fromkeys((r["method"], r["strategy"]) for r in result_rows):
        by_fraction = {r["fraction"]: r for r in result_rows if r["method"] == method and r["strategy"] == label}
        spec = next(iter(by_fraction.values()))["strategy_spec"]
        lines.append(f"| {method} | {spec} | " + " | ".join(cell(by_fraction[f]) if f in by_fraction else "-"
                                                          for f in fractions) + " |")
    return "\n".join(lines)


def _points(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def accuracy_table(result_rows: list[dict]) -> str:
    return _grid(result_rows, lambda r: f"{100 * r['accuracy']:.1f}")


def drop_table(result_rows: list[dict]) -> str:
    return _grid(result_rows, lambda r: f"{_points(r['drop_vs_same_strategy_clean'])} / "
                                        f"{_points(r['drop_vs_fedavg_clean'])}")


def norm_stats(records: list[dict]) -> list[dict[str, Any]]:
    """Per method: honest update norms of the fedavg run without attackers (what C was chosen from), C (from its
    norm-bound runs' strategy), and the norms the attackers sent in the fedavg run with the most attackers."""
    out = []
    for method in dict.fromkeys(r["method"] for r in records):
        runs = {r["fraction"]: r for r in records if r["method"] == method and r["strategy"] == "fedavg"}
        if 0.0 not in runs:
            continue
        honest = [v for rnd in runs[0.0]["update_norms"] for v in rnd.values()]
        worst = runs[max(runs)]
        bad = {str(n) for n in worst["malicious_clients"] or []}
        attacker = [v for rnd in worst["update_norms"] for node, v in rnd.items() if node in bad]
        out.append({"method": method, "honest_median": statistics.median(honest), "honest_min": min(honest),
                    "honest_max": max(honest), "updates": len(honest), "c": _norm_bound(records, method),
                    "attacker_median": statistics.median(attacker) if attacker else None,
                    "attacker_fraction": max(runs)})
    return out


def _norm_bound(records: list[dict], method: str) -> float | None:
    """C of the method's norm-bound runs (``norm-bound:C``), if it has any."""
    spec = next((r["strategy_spec"] for r in records if r["method"] == method and r["strategy"] == "norm-bound"), None)
    return float(spec.partition(":")[2]) if spec and ":" in spec else None


def norm_table(norms: list[dict]) -> str:
    head = ("| method | C | honest update norm, fedavg without attackers: median (min - max, updates) | "
            "attackers' update norm, fedavg with the most attackers: median |")
    lines = [head, "|---|---|---|---|"]
    for n in norms:
        c = "-" if n["c"] is None else f"{n['c']:g}"
        share = round(100 * n["attacker_fraction"])
        bad = "-" if n["attacker_median"] is None else f"{n['attacker_median']:.3f} ({share}%)"
        lines.append(f"| {n['method']} | {c} | {n['honest_median']:.3f} ({n['honest_min']:.3f} - "
                     f"{n['honest_max']:.3f}, {n['updates']}) | {bad} |")
    return "\n".join(lines)


def plot_accuracy_vs_attackers(result_rows: list[dict], path: Path) -> None:
    """One panel per method: final accuracy against the share of attackers, one line per strategy."""
    methods = list(dict.fromkeys(r["method"] for r in result_rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.4), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for i, label in enumerate(dict.fromkeys(r["strategy"] for r in result_rows if r["method"] == method)):
            runs = sorted((r for r in result_rows if r["method"] == method and r["strategy"] == label),
                          key=lambda r: r["fraction"])
            ax.plot([100 * r["fraction"] for r in runs], [100 * r["accuracy"] for r in runs], marker="o",
                    markersize=4, linestyle=("-", "--", "-.", ":")[i % 4], label=runs[0]["strategy_spec"])
        ax.set_title(method)
        ax.set_xlabel("attackers (% of clients)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md: setup, accuracy and points lost per strategy and attacker share, the plot, and how C was chosen."""
    records = flat([r for stage in stages.values() for r in stage], out / "runs")
    result_rows, norms = rows(records), norm_stats(records)
    if result_rows:
        plot_accuracy_vs_attackers(result_rows, out / PLOT)
    b = lambda key: base_value(sweep, key)  # noqa: E731
    attack, scale = b("adversary.attack"), b("adversary.scale")
    attackers = {r["fraction"]: r["malicious_clients"] for r in result_rows}
    rates = ", ".join(dict.fromkeys(f"{r['method']} {r['learning_rate']:g}" for r in records))
    strategies = ", ".join(f"`{x}`" for x in dict.fromkeys(r["strategy"] for r in records))
    parts = [*preamble(sweep, result), "## Setup", "",
             f"- Model `{b('model.name')}`; SST-2: {b('data.max_train_examples')} training rows from "
             f"`{Path(b('data.dataset')).name}`, accuracy on the 872-row `{Path(b('data.eval_dataset')).name}`; max "
             f"{b('model.max_length')} tokens; IID over {b('federation.clients')} clients (all sampled every round), "
             f"{b('federation.rounds')} rounds of {b('federation.local_epochs')} local epoch(s), batch "
             f"{b('train.batch_size')}, AdamW; one seed ({b('train.seed')}); learning rates {rates} (from the `tune` "
             "preset).",
             f"- Attack: `{attack}` with scale {scale:g}: each malicious client trains honestly, then sends "
             f"the global state minus {scale:g}x its update. This scaled sign flip is the standard model-"
             "poisoning attack against FedAvg: with k of n clients attacking, the mean moves by about "
             f"(n - k - {scale:g}k) / n of an honest step, i.e. backwards from one attacker in ten.",
             "- Malicious clients (fixed by the seed, the same for every strategy): "
             + "; ".join(f"{round(100 * f)}%: {v or 'none'}" for f, v in attackers.items()) + ".",
             f"- Strategies: {strategies}; norm-bound's C per method below. "
             "Trimmed mean 0.3 drops 3 of 10 values at each end; Multi-Krum with F=3 averages the 7 updates with "
             "the best Krum scores.", "",
             "## Accuracy % (final global model)", "", accuracy_table(result_rows), "",
             "## Points lost: vs the same strategy without attackers / vs FedAvg without attackers", "",
             "Positive = lower accuracy than the reference.", "", drop_table(result_rows), "",
             f"![accuracy vs attackers]({PLOT})", "", "## Norm bound: how C was chosen", "",
             "C is the median L2 norm (all trainable tensors together) of the honest updates in the fedavg run "
             "without attackers, over every client and round, rounded; each run records the norm of every update "
             f"the server received in `runs/.../{NORMS_FILE}`.", "",
             norm_table(norms), "",
             "Per-round accuracies are in `results.json`; each run's round log, summary and update norms under "
             "`runs/`.", ""]
    return "\n".join(parts)
