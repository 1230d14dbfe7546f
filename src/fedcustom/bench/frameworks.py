"""`fedcustom bench --preset frameworks`: the three federated LLM frameworks of arXiv 2501.04436.

FedLLM (parameter sharing: LoRA and prefix tuning), KD-FedLLM (soft labels on a public set) and
Split-FedLLM (activations and gradients at a cut, full or LoRA client half), on SST-2 with MiniLM:
accuracy, MB per client per round in each direction, client FLOPs and server FLOPs. Three sweeps
around one base setting: the cut layer (split), the public set size (KD) and the number of clients
(every framework).
"""

from __future__ import annotations

import json
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

FAMILIES = {"lora": "FedLLM", "prefix": "FedLLM", "distill": "KD-FedLLM", "split": "Split-FedLLM"}
KEYS = ("final_accuracy", "accuracy_per_round", "centralized_accuracy", "bytes_up_per_round", "bytes_down_per_round",
        "client_flops_per_round", "server_flops_per_round", "round_wall_seconds", "wall_seconds", "trainable_params",
        "public_examples", "learning_rate", "rejected_updates")


@dataclass(frozen=True)
class Setting(Sst2Setting):
    """The shared SST-2 budget every framework run uses, 3 rounds."""

    rounds: int = 3


@dataclass(frozen=True)
class Variant:
    """One framework configuration; ``sweep`` names the study it belongs to ("base" for the headline table)."""

    key: str
    title: str
    method: dict[str, Any]
    lr: float
    sweeps: tuple[str, ...] = ("base",)
    clients: int | None = None  # None: the setting's
    centralized: bool = False
    local_epochs: int | None = None  # None: the setting's

    @property
    def family(self) -> str:
        return FAMILIES[self.method["name"]]


# Rates: LoRA and prefix from the `tune` preset (presets.PAPER_LRS); KD's clients and server run LoRA at
# LoRA's rate; split trains whole layers on the server at full fine-tuning's rate (1e-4).
KD = {"name": "distill", "local_method": "lora"}
VARIANTS: tuple[Variant, ...] = (
    Variant("lora", "FedLLM LoRA", {"name": "lora"}, 3e-3, ("base", "clients"), centralized=True),
    Variant("prefix", "FedLLM prefix", {"name": "prefix"}, 3e-2, ("base", "clients")),
    Variant("kd-public100", "KD-FedLLM (LoRA, 100 public)", {**KD, "public_size": 100}, 3e-3,
            ("base", "public", "clients")),
    Variant("kd-public25", "KD-FedLLM (LoRA, 25 public)", {**KD, "public_size": 25}, 3e-3, ("public",)),
    Variant("kd-public200", "KD-FedLLM (LoRA, 200 public)", {**KD, "public_size": 200}, 3e-3, ("public",)),
    Variant("kd-top1-adapter", "KD-FedLLM (top-1 up, adapter down)",
            {**KD, "public_size": 100, "topk": 1, "broadcast": "adapter"}, 3e-3, ("base",)),
    Variant("kd-public100-3epochs", "KD-FedLLM (LoRA, 100 public, 3 local epochs)", {**KD, "public_size": 100},
            3e-3, ("base",), local_epochs=3),
    Variant("split-cut3", "Split-FedLLM (cut 3)", {"name": "split", "cut_layer": 3}, 1e-4, ("base", "cut", "clients")),
    Variant("split-cut1", "Split-FedLLM (cut 1)", {"name": "split", "cut_layer": 1}, 1e-4, ("cut",)),
    Variant("split-cut5", "Split-FedLLM (cut 5)", {"name": "split", "cut_layer": 5}, 1e-4, ("cut",)),
    Variant("split-lora-cut3", "Split-FedLLM (cut 3, LoRA client half)",
            {"name": "split", "cut_layer": 3, "split_client": "lora"}, 1e-4, ("base", "cut")),
)
MORE_CLIENTS = 10


def all_runs(variants: tuple[Variant, ...] = VARIANTS) -> list[Variant]:
    """Every run: each variant once, plus the ``clients`` sweep's variants with more clients."""
    more = [Variant(f"{v.key}-{MORE_CLIENTS}clients", f"{v.title}, {MORE_CLIENTS} clients", v.method, v.lr,
                    ("clients",), clients=MORE_CLIENTS) for v in variants if "clients" in v.sweeps]
    return [*variants, *more]


def run_config(setting: Setting, variant: Variant, data_dir: Path, out: Path) -> RunConfig:
    """The RunConfig of one run (the same as `fedcustom run` flags)."""
    return setting.run_config(
        data_dir, out / "runs" / variant.key, variant.method, variant.lr,
        federation={"clients": variant.clients or setting.clients,
                    "local_epochs": variant.local_epochs or setting.local_epochs},
        train={"centralized": variant.centralized})


def run_variant(setting: Setting, variant: Variant, data_dir: Path, out: Path) -> dict[str, Any]:
    """Run one variant, or reuse its summary when the identical config already ran."""
    cfg = run_config(setting, variant, data_dir, out)
    record = {"key": variant.key, "title": variant.title, "family": variant.family, "sweeps": list(variant.sweeps),
              "clients": cfg.federation.clients, "local_epochs": cfg.federation.local_epochs,
              "method": dict(variant.method)}
    summary, record["reused"] = run_or_reuse(cfg)
    return {**record, **{k: summary.get(k) for k in KEYS}}


def run_frameworks(data_dir: Path, out: Path, console: Console, setting: Setting = Setting(),
                   variants: tuple[Variant, ...] = VARIANTS) -> list[dict]:
    """Every run of the grid in order, one line per finished run."""
    for rel in (setting.train, setting.eval):
        if not (data_dir / rel).is_file():
            raise FedCustomError(f"benchmark data {data_dir / rel}: not found; expected the shared data folder at "
                                 f"--data-dir {data_dir}")
    records = []
    todo = all_runs(variants)
    for i, variant in enumerate(todo, 1):
        start = time.perf_counter()
        records.append(run_variant(setting, variant, data_dir, out))
        console.print(f"[{i}/{len(todo)}] {variant.key}: accuracy {records[-1]['final_accuracy']:.4f} "
                      f"({time.perf_counter() - start:.0f} s)")
    return records


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


def report(records: list[dict], setting: Setting, command: str, machine: dict[str, Any], wall: float) -> str:
    """report.md: the headline table, one table per sweep, how to read it, and the plot."""
    base = setting
    parts = ["# fedcustom bench — preset `frameworks`", "",
             "FedLLM (parameter sharing), KD-FedLLM and Split-FedLLM (arXiv 2501.04436), measured in one framework.",
             "", f"Command: `{command}`  ", f"Machine: {machine_line(machine)}; "
             f"{len(records)} runs took {sum(r['wall_seconds'] for r in records) / 60:.1f} "
             f"min in all ({sum(r['reused'] for r in records)} reused from an earlier invocation of the same command; "
             f"this invocation {wall / 60:.1f} min).", "", "## Setup", "",
             f"- Model `{base.model}`; SST-2: {base.max_train} training rows drawn from `{base.train}` "
             f"(stratified, seed {base.seed}), accuracy on the 872-row `{base.eval}`; max {base.max_length} tokens; "
             f"{base.partition} split over {base.clients} clients (all sampled), {base.rounds} rounds of "
             f"{base.local_epochs} local epoch(s), batch {base.batch_size}, AdamW, one seed ({base.seed}).",
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
    for sweep, (column, title) in SWEEPS.items():
        if any(sweep in r["sweeps"] for r in records):
            parts += [f"## {title}", "", table(records, sweep, column), ""]
    central = next((r["centralized_accuracy"] for r in records if r["centralized_accuracy"] is not None), None)
    if central is not None:
        parts += [f"Centralized reference (LoRA on the union of the clients' rows, same example passes): "
                  f"{100 * central:.1f} %.", ""]
    parts += ["## Plots", "", "![accuracy vs MB](accuracy_vs_mb.png)", "![client vs server compute](flops.png)", "",
              "Per-round numbers are in `results.json`; each run's round log and summary are under `runs/`.", ""]
    return "\n".join(parts)
