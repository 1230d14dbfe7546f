"""Report of `fedcustom bench --preset frameworks` (sweeps/frameworks.toml): the three federated LLM frameworks of
arXiv 2501.04436.

FedLLM (parameter sharing: LoRA and prefix tuning), KD-FedLLM (soft labels on a public set) and Split-FedLLM
(activations and gradients at a cut, full or LoRA client half), on SST-2 with MiniLM: accuracy, MB per client per
round in each direction, client FLOPs and server FLOPs. Three studies around one base setting: the cut layer
(split), the public set size (KD) and the number of clients (every framework); each variant names the studies it
belongs to in its ``sweeps`` tag ("base" for the headline table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcustom.bench.plots import frameworks_accuracy_vs_mb, frameworks_flops
from fedcustom.bench.report import MB
from fedcustom.bench.sweep import Sweep, base_value, preamble

KEYS = ("final_accuracy", "accuracy_per_round", "centralized_accuracy", "bytes_up_per_round", "bytes_down_per_round",
        "client_flops_per_round", "server_flops_per_round", "round_wall_seconds", "wall_seconds", "trainable_params",
        "public_examples", "learning_rate", "rejected_updates", "clients")


def flat(records: list[dict], sweep: Sweep) -> list[dict[str, Any]]:
    """The sweep's records as one flat record per variant: its tags, its [method] settings and its measurements."""
    settings = {v.label: v.settings for v in sweep.axes["variant"]}
    out = []
    for r in records:
        own = settings[r["labels"]["variant"]]
        out.append({"key": r["labels"]["variant"], "title": r["tags"]["title"], "family": r["tags"]["family"],
                    "sweeps": list(r["tags"]["sweeps"]), "method": dict(own.get("method", {})),
                    "local_epochs": own.get("federation", {}).get("local_epochs",
                                                                  base_value(sweep, "federation.local_epochs")),
                    "reused": r["reused"], **{k: r["summary"].get(k) for k in KEYS}})
    return out


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """The frameworks comparison states no target: it measures."""
    return []


def _gflops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.1f}"


def table(records: list[dict], sweep: str, first: str) -> str:
    """One markdown table of the runs in ``sweep``; ``first`` names the column that varies."""
    head = (f"| {first} | family | accuracy % | MB up / client / round | MB down / client / round | "
            "client GFLOPs / round | server GFLOPs / client / round | s / round |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in (r for r in records if sweep in r["sweeps"]):
        column = {"clients": str(r["clients"]), "cut": str(r["method"].get("cut_layer", "-")),
                  "public": str(r["public_examples"] or "-")}.get(sweep, r["title"])
        if sweep != "base":
            column = f"{column} ({r['title']})"
        wall = sum(r["round_wall_seconds"]) / len(r["round_wall_seconds"])
        lines.append(f"| {column} | {r['family']} | {100 * r['final_accuracy']:.1f} | {r['bytes_up_per_round'] / MB:.3f} "
                     f"| {r['bytes_down_per_round'] / MB:.3f} | {_gflops(r['client_flops_per_round'])} "
                     f"| {_gflops(r['server_flops_per_round'])} | {wall:.1f} |")
    return "\n".join(lines)


SWEEPS = {"cut": ("cut layer", "Split-FedLLM: where the model is cut (layers on the client)"),
          "public": ("public rows", "KD-FedLLM: size of the public set the clients label"),
          "clients": ("clients", "Every framework with more clients (the same rows split finer)")}


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md: the headline table, one table per study, how to read it, and the two plots."""
    records = flat([r for stage in stages.values() for r in stage], sweep)
    if records:
        frameworks_accuracy_vs_mb(records, out / "accuracy_vs_mb.png")
        frameworks_flops(records, out / "flops.png")
    b = lambda key: base_value(sweep, key)  # noqa: E731
    parts = [*preamble(sweep, result), "## Setup", "",
             f"- Model `{b('model.name')}`; SST-2: {b('data.max_train_examples')} training rows drawn from "
             f"`{Path(b('data.dataset')).name}` (stratified, seed {b('train.seed')}), accuracy on the 872-row "
             f"`{Path(b('data.eval_dataset')).name}`; max {b('model.max_length')} tokens; {b('data.partition')} split "
             f"over {b('federation.clients')} clients (all sampled), {b('federation.rounds')} rounds of "
             f"{b('federation.local_epochs')} local epoch(s), batch {b('train.batch_size')}, AdamW, one seed "
             f"({b('train.seed')}).",
             "- FedLLM: LoRA (r 8, lr 3e-3) and prefix tuning (20 tokens, lr 3e-2) upload and average their "
             "trainable tensors.",
             "- KD-FedLLM: each client fine-tunes its own LoRA model (lr 3e-3) and uploads its logits on a public set "
             "of SST-2 training rows outside the clients' (labels dropped); the server averages the soft labels "
             "(temperature 2, weighted by client data size), distills them into its LoRA model for 3 passes and "
             "broadcasts its own soft labels, which clients distill for one pass before local training. One variant "
             "uploads only the top-1 soft label and broadcasts the global adapter instead.",
             "- Split-FedLLM: SplitFed (client halves averaged every round; the server half trains on each client's "
             "batches in turn), lr 1e-4; the client half trains every weight, or only LoRA on its layers. Bytes "
             "include every per-batch message plus the client half's weights at the start and end of a round.",
             "- Server GFLOPs are the server's training work per client per round (split: the server half on that "
             "client's batches; KD: distillation and labelling the public set, split evenly over the clients).",
             "", "## All frameworks", "", table(records, "base", "framework"), ""]
    for sweep_name, (column, title) in SWEEPS.items():
        if any(sweep_name in r["sweeps"] for r in records):
            parts += [f"## {title}", "", table(records, sweep_name, column), ""]
    central = next((r["centralized_accuracy"] for r in records if r["centralized_accuracy"] is not None), None)
    if central is not None:
        parts += [f"Centralized reference (LoRA on the union of the clients' rows, same example passes): "
                  f"{100 * central:.1f} %.", ""]
    parts += ["## Plots", "", "![accuracy vs MB](accuracy_vs_mb.png)", "![client vs server compute](flops.png)", "",
              "Per-round numbers are in `results.json`; each run's round log and summary are under `runs/`.", ""]
    return "\n".join(parts)
