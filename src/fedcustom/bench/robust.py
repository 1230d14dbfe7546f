"""`fedcustom bench --preset robust`: accuracy under 0%, 10% and 30% attackers, FedAvg vs robust strategies.

For prefix tuning and LoRA on SST-2 with MiniLM, every strategy of fedcustom.strategies.robust
(coordinate-wise median and trimmed mean, Yin et al. ICML 2018; Multi-Krum, Blanchard et al.
NeurIPS 2017; norm bounding, Sun et al. arXiv:1911.07963) against FedAvg, while a fixed share of
the clients sends a scaled sign-flipped update (-SCALE x its honest update; the model-poisoning
attack that Blanchard et al. show breaks any linear merge such as FedAvg). The attackers are fixed
by the seed, so every strategy faces the same clients. Each run also records the L2 norm of every
update the server received, which is how norm bounding's C was chosen.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import torch
from rich.console import Console

from fedcustom.bench.report import machine_line
from fedcustom.bench.reuse import run_or_reuse
from fedcustom.bench.settings import Sst2Setting
from fedcustom.config import RunConfig
from fedcustom.errors import FedCustomError
from fedcustom.report import write_json
from fedcustom.strategies import ClientUpdate, Strategy
from fedcustom.strategies.robust import global_norm

KEYS = ("final_accuracy", "accuracy_per_round", "malicious_clients", "attack", "attack_scale", "rejected_updates",
        "wall_seconds")
NORMS_FILE = "update_norms.json"
PLOT = "accuracy_vs_attackers.png"


@dataclass(frozen=True)
class RobustSetting(Sst2Setting):
    """The shared SST-2 budget (the `codecs` preset's, 10 clients), the attack and the strategies compared."""

    clients: int = 10  # all sampled every round
    methods: tuple[tuple[str, float], ...] = (("prefix", 3e-2), ("lora", 3e-3))  # rates from the `tune` preset
    attack: str = "sign-flip"
    attack_scale: float = 10.0
    fractions: tuple[float, ...] = (0.0, 0.1, 0.3)
    strategies: tuple[str, ...] = ("fedavg", "median", "trimmed-mean:0.3", "multi-krum:3", "norm-bound")
    # norm-bound's C per method: the median L2 norm of the honest updates (10 clients x 5 rounds) of this
    # preset's fedavg run without attackers, to 2 significant figures: prefix 21.73 -> 22, LoRA 2.095 -> 2.1
    # (AdamW steps have a near-constant size, so all 50 norms lie within about 15% of the median).
    norm_bound: tuple[tuple[str, float], ...] = (("prefix", 22.0), ("lora", 2.1))


def strategy_spec(setting: RobustSetting, method: str, label: str) -> str:
    """The --strategy of one run; a bare ``norm-bound`` takes the method's C from the setting."""
    if label != "norm-bound":
        return label
    bounds = dict(setting.norm_bound)
    if method not in bounds:
        raise FedCustomError(f"robust preset: no norm-bound C for method {method!r}; set RobustSetting.norm_bound")
    return f"norm-bound:{bounds[method]:g}"


def run_config(s: RobustSetting, method: str, lr: float, label: str, fraction: float, data_dir: Path,
               out: Path) -> RunConfig:
    key = label.replace(":", "")
    return s.run_config(data_dir, out / "runs" / method / key / f"attackers{round(100 * fraction)}", {"name": method},
                        lr, federation={"strategy": strategy_spec(s, method, label)}, train={"count_flops": False},
                        adversary={"attack": s.attack, "fraction": fraction, "scale": s.attack_scale})


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


def run_one(cfg: RunConfig) -> tuple[dict[str, Any], list[dict[str, float]], bool]:
    """(summary, update norms per round, reused) of one run; a finished run with the same config is reused."""
    folder = Path(cfg.output.dir)

    def record_norms(job: Any) -> Callable[[dict[str, Any]], None]:
        recorder = NormRecorder(job.server.strategy)
        job.server.strategy = recorder
        return lambda _summary: write_json(folder / NORMS_FILE, recorder.rounds)

    summary, reused = run_or_reuse(cfg, complete=lambda _s: (folder / NORMS_FILE).is_file(), instrument=record_norms)
    return summary, json.loads((folder / NORMS_FILE).read_text()), reused


def run_robust(data_dir: Path, out: Path, console: Console,
               setting: RobustSetting = RobustSetting()) -> list[dict[str, Any]]:
    """Every (method, strategy, attacker fraction) run, reusing finished ones with the same config."""
    for rel in (setting.train, setting.eval):
        if not (data_dir / rel).is_file():
            raise FedCustomError(f"benchmark data {data_dir / rel}: not found; expected the shared data folder")
    records = []
    todo = [(m, lr, label, f) for m, lr in setting.methods for label in setting.strategies for f in setting.fractions]
    for i, (method, lr, label, fraction) in enumerate(todo, 1):
        cfg = run_config(setting, method, lr, label, fraction, data_dir, out)
        start = time.perf_counter()
        summary, norms, reused = run_one(cfg)
        records.append({"method": method, "strategy": label, "strategy_spec": cfg.federation.strategy,
                        "fraction": fraction, "reused": reused, **{k: summary.get(k) for k in KEYS},
                        "update_norms": norms})
        console.print(f"[{i}/{len(todo)}] {method} {cfg.federation.strategy} {round(100 * fraction)}% attackers: "
                      f"accuracy {summary['final_accuracy']:.4f} ({time.perf_counter() - start:.0f} s)")
    return records


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


def norm_stats(records: list[dict], setting: RobustSetting) -> list[dict[str, Any]]:
    """Per method: honest update norms of the fedavg run without attackers (what C was chosen from), C, and the
    norms the attackers sent in the fedavg run with the most attackers."""
    out = []
    for method, _ in setting.methods:
        runs = {r["fraction"]: r for r in records if r["method"] == method and r["strategy"] == "fedavg"}
        if 0.0 not in runs:
            continue
        honest = [v for rnd in runs[0.0]["update_norms"] for v in rnd.values()]
        worst = runs[max(runs)]
        bad = {str(n) for n in worst["malicious_clients"] or []}
        attacker = [v for rnd in worst["update_norms"] for node, v in rnd.items() if node in bad]
        out.append({"method": method, "honest_median": statistics.median(honest), "honest_min": min(honest),
                    "honest_max": max(honest), "updates": len(honest), "c": dict(setting.norm_bound).get(method),
                    "attacker_median": statistics.median(attacker) if attacker else None,
                    "attacker_fraction": max(runs)})
    return out


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


def report(result_rows: list[dict], norms: list[dict], setting: RobustSetting, command: str,
           machine: dict[str, Any], wall: float, records: list[dict]) -> str:
    s = setting
    attackers = {r["fraction"]: r["malicious_clients"] for r in result_rows}
    run_minutes = sum(r["wall_seconds"] or 0.0 for r in records) / 60
    parts = ["# fedcustom bench — preset `robust`", "",
             "FedAvg against Byzantine-robust strategies while a share of the clients poisons its update.", "",
             f"Command: `{command}`  ", f"Machine: {machine_line(machine)}; "
             f"{len(records)} runs ({sum(r['reused'] for r in records)} reused), "
             f"{run_minutes:.1f} min of runs in all, this invocation {wall / 60:.1f} min.", "", "## Setup", "",
             f"- Model `{s.model}`; SST-2: {s.max_train} training rows from `{s.train}`, accuracy on the 872-row "
             f"`{s.eval}`; max {s.max_length} tokens; IID over {s.clients} clients (all sampled every round), "
             f"{s.rounds} rounds of {s.local_epochs} local epoch(s), batch {s.batch_size}, AdamW; one seed "
             f"({s.seed}); learning rates " + ", ".join(f"{m} {lr:g}" for m, lr in s.methods)
             + " (from the `tune` preset).",
             f"- Attack: `{s.attack}` with scale {s.attack_scale:g}: each malicious client trains honestly, then sends "
             f"the global state minus {s.attack_scale:g}x its update. This scaled sign flip is the standard model-"
             "poisoning attack against FedAvg: with k of n clients attacking, the mean moves by about "
             f"(n - k - {s.attack_scale:g}k) / n of an honest step, i.e. backwards from one attacker in ten.",
             "- Malicious clients (fixed by the seed, the same for every strategy): "
             + "; ".join(f"{round(100 * f)}%: {v or 'none'}" for f, v in attackers.items()) + ".",
             "- Strategies: " + ", ".join(f"`{x}`" for x in s.strategies) + "; norm-bound's C per method below. "
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
             "Per-round accuracies and update norms are in `results.json`; each run's round log and summary under "
             "`runs/`.", ""]
    return "\n".join(parts)
