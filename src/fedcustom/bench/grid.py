"""Run a preset's grid: one federated job per cell, the centralized baseline once per
(dataset, method, learning rate, seed) — it trains on the union of the clients' rows for the same
number of example passes, so it does not depend on how the rows were split."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.flop_counter import FlopCounterMode

from fedcustom.bench.presets import BenchDataset, BenchPreset
from fedcustom.bench.reuse import pinned, run_or_reuse
from fedcustom.config import RunConfig
from fedcustom.data import make_loader
from fedcustom.errors import FedCustomError
from fedcustom.report import write_json

CELL_KEYS = (
    "final_accuracy", "final_macro_f1", "centralized_accuracy", "centralized_macro_f1", "accuracy_per_round",
    "round_wall_seconds", "bytes_up_per_round", "bytes_down_per_round", "client_flops_per_round",
    "trainable_params", "trainable_bytes_fp32", "total_params", "train_examples", "eval_examples", "wall_seconds",
    "learning_rate", "rejected_updates", "centralized", "client_data",
)


@dataclass(frozen=True)
class Cell:
    """One federated run of the grid."""

    dataset: BenchDataset
    method: str
    lr: float
    split: str
    seed: int
    centralized: bool

    @property
    def name(self) -> str:
        split = self.split.replace(":", "")
        return f"{self.dataset.key}/{self.method}-lr{self.lr:g}/{split}/seed{self.seed}"


def cells(preset: BenchPreset) -> list[Cell]:
    """Every cell of the grid; the first split of a dataset also runs the centralized baseline."""
    return [
        Cell(ds, method, lr, split, seed, preset.centralized and split == ds.splits[0])
        for ds in preset.datasets for seed in preset.seeds for method in preset.methods
        for lr in preset.lrs[method] for split in ds.splits
    ]


def check_data(preset: BenchPreset, data_dir: Path) -> None:
    """Fail before any training if a benchmark file is missing."""
    for ds in preset.datasets:
        for rel in filter(None, (ds.train, ds.eval)):
            if not (data_dir / rel).is_file():
                raise FedCustomError(f"benchmark data {data_dir / rel}: not found; expected the shared data folder "
                                     f"(sst2/, ag_news/) at --data-dir {data_dir}")


def cell_config(preset: BenchPreset, cell: Cell, data_dir: Path, out: Path) -> RunConfig:
    """The RunConfig of one cell (the same thing `fedcustom run` would take as flags)."""
    ds = cell.dataset
    return pinned({
        "model": {"name": preset.model, "max_length": ds.max_length},
        "data": {
            "dataset": str(data_dir / ds.train), "eval_dataset": str(data_dir / ds.eval) if ds.eval else None,
            "eval_fraction": ds.eval_fraction, "split_seed": ds.split_seed, "partition": cell.split,
            "max_train_examples": ds.max_train, "max_eval_examples": ds.max_eval,
        },
        "method": {"name": cell.method, "num_virtual_tokens": preset.num_virtual_tokens, "lora_r": preset.lora_r},
        "federation": {"clients": preset.clients, "rounds": preset.rounds, "local_epochs": preset.local_epochs},
        "train": {"batch_size": preset.batch_size, "lr": cell.lr, "seed": cell.seed, "centralized": cell.centralized},
        "output": {"dir": str(out / "runs" / cell.name), "quiet": True, "save_model": False, "checkpoint": False},  # logs only
    })


def forward_flops_ratio(job: Any) -> float:
    """FLOPs of one training step of the method / FLOPs of one forward pass of the bare frozen
    backbone, both counted on the same batch of evaluation rows (the paper's compute unit)."""
    batch = next(iter(make_loader(job.data.eval, job.tokenizer, job.cfg.train.batch_size, seed=None)))
    model = job.model
    model.train()
    with FlopCounterMode(display=False) as train_count:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Prompt/prefix tuning live in PeftModel.forward, so the base model alone is the bare backbone
    # (and PEFT 0.21's disable_adapter() breaks on prompt-learning classifiers). LoRA patches the
    # base model's layers, so it needs disable_adapter().
    prompt_learning = hasattr(model, "peft_config") and model.peft_config[model.active_adapter].is_prompt_learning
    with torch.no_grad(), FlopCounterMode(display=False) as forward_count:
        if hasattr(model, "disable_adapter") and not prompt_learning:
            with model.disable_adapter():
                base(**batch)
        else:
            base(**batch)
    return train_count.get_total_flops() / forward_count.get_total_flops()


def run_cell(preset: BenchPreset, cell: Cell, data_dir: Path, out: Path) -> dict[str, Any]:
    """Run one cell (or reuse its finished result when the same config already ran) and return its record."""
    cfg = cell_config(preset, cell, data_dir, out)
    summary_path = Path(cfg.output.dir) / "summary.json"
    record = {"dataset": cell.dataset.key, "method": cell.method, "lr": cell.lr, "split": cell.split,
              "seed": cell.seed, "run_dir": str(Path(cfg.output.dir).relative_to(out))}

    def measure_flops(job: Any) -> Callable[[dict[str, Any]], None]:
        ratio = forward_flops_ratio(job)  # on the untrained model, before the rounds

        def finish(summary: dict[str, Any]) -> None:
            summary["flops_vs_forward"] = ratio
            write_json(summary_path, summary)
        return finish

    summary, reused = run_or_reuse(cfg, complete=lambda s: "flops_vs_forward" in s, instrument=measure_flops)
    return {**record, **{k: summary.get(k) for k in CELL_KEYS}, "flops_vs_forward": summary["flops_vs_forward"],
            "reused": reused}


def run_grid(preset: BenchPreset, data_dir: Path, out: Path, console: Console) -> list[dict[str, Any]]:
    """Every cell in order, with a progress bar; results accumulate in grid order."""
    check_data(preset, data_dir)
    todo = cells(preset)
    records: list[dict[str, Any]] = []
    columns = (TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=len(todo))
        for i, cell in enumerate(todo, 1):
            progress.update(task, description=cell.name)
            start = time.perf_counter()
            records.append(run_cell(preset, cell, data_dir, out))
            progress.advance(task)
            if not console.is_terminal:
                acc = records[-1]["final_accuracy"]
                console.print(f"[{i}/{len(todo)}] {cell.name}: accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s)")
    return records
