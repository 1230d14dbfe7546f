"""The SST-2 classification budget the codecs, frameworks and robust presets share, and the RunConfig of one of
their runs built from it (the same thing `fedcustom run` would take as flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcustom.bench.reuse import pinned
from fedcustom.config import RunConfig


@dataclass(frozen=True)
class Sst2Setting:
    """Data, model and schedule of a preset's runs; a preset subclasses it with its own axes and defaults."""

    train: str = "sst2/train.tsv"
    eval: str = "sst2/validation.tsv"
    max_train: int = 400
    max_length: int = 48
    clients: int = 5
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 8
    seed: int = 0
    partition: str = "iid"
    model: str = "minilm"

    def run_config(self, data_dir: Path, out_dir: Path, method: dict[str, Any], lr: float,
                   seed: int | None = None, federation: dict[str, Any] | None = None,
                   train: dict[str, Any] | None = None, **sections: dict[str, Any]) -> RunConfig:
        """One run on this budget: ``federation`` and ``train`` add to (or override) the budget's keys; other
        sections (codec, adversary) are taken as given. Logs only: no model, no checkpoint."""
        return pinned({
            "model": {"name": self.model, "max_length": self.max_length},
            "data": {"dataset": str(data_dir / self.train), "eval_dataset": str(data_dir / self.eval),
                     "partition": self.partition, "max_train_examples": self.max_train},
            "method": dict(method),
            "federation": {"clients": self.clients, "rounds": self.rounds, "local_epochs": self.local_epochs,
                           **(federation or {})},
            "train": {"batch_size": self.batch_size, "lr": lr, "seed": self.seed if seed is None else seed,
                      **(train or {})},
            **sections,
            "output": {"dir": str(out_dir), "quiet": True, "save_model": False, "checkpoint": False},
        })
