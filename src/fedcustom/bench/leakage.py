"""Report of `fedcustom bench --preset leakage` (sweeps/leakage.toml): how much federated prefix tuning, LoRA and
full fine-tuning leak about the training rows, without DP and with client-level DP (DP-FedAvg, the server adds
Gaussian noise to the clipped mean) at several noise levels, measured by membership inference
(fedcustom.attacks_mia).

Two targets per run: the final global model (what anyone who receives it sees), and one client's upload in the
next round (what an honest-but-curious server sees without secure aggregation). The seed paper names the first as
its open limitation ("the exchanged prefix vectors could still leak information"). The runs are made to overfit
(few rows per client, several local epochs), so that leakage is measurable at all on this budget."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt
import numpy as np

from fedcustom.bench.cells import add_to_summary
from fedcustom.bench.sweep import Sweep, base_value, cells, preamble
from fedcustom.config import PrivacyConfig

LEAKAGE_FILE = "leakage.json"
PLOT = "leakage_auc_vs_epsilon.png"
AUC_TARGET = 0.05  # the target: AUC within 0.05 of 0.5 ...
ACCURACY_BUDGET = 0.02  # ... at the smallest epsilon that costs at most 2 points of accuracy
OBSERVED_CLIENT = 0  # whose next upload the second attack targets


def measure(job: Any, node: int = OBSERVED_CLIENT) -> dict[str, Any]:
    """Both attacks against the final global model and against one client's next upload; the model is left as the
    run left it (the final global state)."""
    from fedcustom.attacks_mia import attacks, per_example_losses
    from fedcustom.methods import load_trainable_state, trainable_state

    model, data, tokenizer, batch = job.model, job.data, job.tokenizer, job.eval_batch
    final = trainable_state(model)
    client_rows = data.client_table(node)

    def losses() -> dict[str, np.ndarray]:
        return {"members": per_example_losses(model, data.train, tokenizer, batch),
                "client": per_example_losses(model, client_rows, tokenizer, batch),
                "non_members": per_example_losses(model, data.test.table, tokenizer, batch)}

    target = losses()
    load_trainable_state(model, job.initial)  # the reference: round 0, which saw no row
    reference = losses()
    load_trainable_state(model, job.server.observed_update(node, job.cfg.federation.rounds + 1))
    update = losses()
    load_trainable_state(model, final)
    pairs = lambda d, members: (d[members], d["non_members"])  # noqa: E731
    return {
        "global_model": {k: asdict(v) for k, v in attacks(pairs(target, "members"), pairs(reference, "members")).items()},
        "client_update": {k: asdict(v) for k, v in attacks(pairs(update, "client"), pairs(reference, "client")).items()},
        "mean_loss": {"members": float(target["members"].mean()), "non_members": float(target["non_members"].mean())},
    }


def instrument(job: Any, folder: Path) -> Callable[[dict[str, Any]], None]:
    """After the run: both attacks (:func:`measure`) and the client-level epsilon after the last round (from the
    round log), added to the run's summary (and its summary.json), so that the sweep's records carry them."""
    def finish(summary: dict[str, Any]) -> None:
        log = (folder / "round_log.jsonl").read_text().splitlines()
        add_to_summary(folder, summary, {"leakage": measure(job), "final_epsilon": json.loads(log[-1]).get("epsilon")})
    return finish


def complete(folder: Path, summary: dict[str, Any]) -> bool:
    """A finished run counts only with its leakage measurement."""
    return "leakage" in summary


def flat(records: list[dict]) -> list[dict[str, Any]]:
    """The sweep's records as one flat record per (method, noise) run."""
    return [{"method": r["labels"]["method"], "noise": r["tags"]["noise_multiplier"], "clip": r["tags"].get("clip")
             if r["tags"]["noise_multiplier"] else None, "accuracy": r["summary"]["final_accuracy"],
             "epsilon": r["summary"]["final_epsilon"], "leakage": r["summary"]["leakage"], "reused": r["reused"],
             "wall_seconds": r["summary"].get("wall_seconds")} for r in records]


def targets(records: list[dict[str, Any]]) -> list[str]:
    """The sweep's targets, one line per method: see :func:`method_targets`."""
    return method_targets(flat(records))


def method_targets(records: list[dict[str, Any]]) -> list[str]:
    """Per method: the smallest epsilon costing at most 2 points of accuracy, and whether its AUCs are within 0.05
    of 0.5."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in records):
        runs = [r for r in records if r["method"] == method]
        clean = next((r for r in runs if not r["noise"]), None)
        if clean is None:
            continue
        cheap = [r for r in runs if r["noise"] and r["epsilon"] is not None
                 and r["accuracy"] >= clean["accuracy"] - ACCURACY_BUDGET]
        if not cheap:
            lines.append(f"- {method}: no noise level costs at most 2 points of accuracy (without DP: "
                         f"{clean['accuracy']:.3f}) — missed")
            continue
        best = min(cheap, key=lambda r: r["epsilon"])
        worst = max(v["auc"] for v in best["leakage"]["global_model"].values())
        ok = abs(worst - 0.5) <= AUC_TARGET
        lines.append(f"- {method}: smallest epsilon within 2 points of accuracy: {best['epsilon']:.2f} (noise "
                     f"{best['noise']:g}, accuracy {best['accuracy']:.3f} vs {clean['accuracy']:.3f}); its highest "
                     f"global-model AUC {worst:.3f} — {'met' if ok else 'missed'}")
    return lines


def plot(records: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for method in dict.fromkeys(r["method"] for r in records):
        runs = sorted((r for r in records if r["method"] == method), key=lambda r: r["noise"])
        xs = [r["noise"] for r in runs]
        ax.plot(xs, [r["leakage"]["global_model"]["reference_ratio"]["auc"] for r in runs], marker="o",
                label=f"{method}: global model")
        ax.plot(xs, [r["leakage"]["client_update"]["reference_ratio"]["auc"] for r in runs], marker="x",
                linestyle="--", label=f"{method}: one client's upload")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=0.03)  # 0 (no DP) and 0.03 .. 3 on one axis
    ax.set_xlim(left=0)
    ax.set_xlabel("client-level DP noise multiplier (0: no DP)")
    ax.set_ylabel("membership AUC (reference attack)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _missing_lines(sweep: Sweep, records: list[dict[str, Any]]) -> list[str]:
    """A line naming the sweep's runs this report lacks (a preset run in parts), else nothing."""
    have = {(r["method"], r["noise"]) for r in records}
    planned = [(c.labels["method"], c.tags["noise_multiplier"]) for stage in sweep.stages for c in cells(sweep, stage)]
    missing = [f"{m} noise {z:g}" for m, z in planned if (m, z) not in have]
    return [f"Not run yet (the report covers the finished runs): {', '.join(missing)}.", ""] if missing else []


def _cell(result: dict[str, Any]) -> str:
    return f"{result['auc']:.3f} / {result['tpr_at_1pct_fpr']:.3f}"


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md: one row per (method, noise) run with both attacks' AUC and TPR, the targets and the plot."""
    records = flat([r for stage in stages.values() for r in stage])
    if not records:
        return "\n".join([*preamble(sweep, result), "No leakage run has finished yet.", ""])
    plot(records, out / PLOT)
    first = records[0]["leakage"]
    delta = base_value(sweep, "privacy.delta") or PrivacyConfig.delta
    counts = {"global_model": first["global_model"]["loss_threshold"]["members"],
              "client_update": first["client_update"]["loss_threshold"]["members"],
              "non_members": first["global_model"]["loss_threshold"]["non_members"]}
    lines = [*preamble(sweep, result), __doc__.split("\n\n")[1].replace("\n", " "), "",
             *_missing_lines(sweep, records),
             f"Each cell: ROC AUC / TPR at 1% FPR. Global model: the {counts['global_model']} training rows against "
             f"{counts['non_members']} held-out rows. One client's upload: client {OBSERVED_CLIENT}'s "
             f"{counts['client_update']} rows against the same held-out rows, from the state it uploads in the round "
             f"after the last (the server decodes it before any noise: central DP adds noise to the mean). Epsilon: "
             f"client-level, at delta {delta:g}, after the last round.", "",
             "| method | DP noise | epsilon | accuracy | global: loss | global: reference | upload: loss | "
             "upload: reference | mean loss members / non-members |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        g, u = r["leakage"]["global_model"], r["leakage"]["client_update"]
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        loss = r["leakage"]["mean_loss"]
        lines.append(f"| {r['method']} | {r['noise']:g} | {eps} | {r['accuracy']:.3f} | {_cell(g['loss_threshold'])} "
                     f"| {_cell(g['reference_ratio'])} | {_cell(u['loss_threshold'])} | {_cell(u['reference_ratio'])} "
                     f"| {loss['members']:.3f} / {loss['non_members']:.3f} |")
    lines += ["", "## Targets", "", *result["targets"], "", f"![AUC vs noise]({PLOT})", ""]
    return "\n".join(lines)
