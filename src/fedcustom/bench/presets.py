"""What a grid benchmark (the quick, paper and tune sweeps) compares, in the form the tables of
fedcustom.bench.report read: methods x learning rates x datasets x splits x seeds, plus centralized baselines.
The grids themselves are sweep files (fedcustom/bench/sweeps/{quick,paper,tune}.toml); fedcustom.bench.paper builds
a BenchPreset from one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BenchDataset:
    """One corpus of the grid, as paths relative to the benchmark data folder."""

    key: str
    title: str
    train: str
    eval: str | None  # None: hold out ``eval_fraction`` of ``train`` with ``split_seed``
    splits: tuple[str, ...]
    max_train: int
    max_eval: int | None
    max_length: int
    eval_fraction: float = 0.2
    split_seed: int = 0  # fixed, so every seed and method is scored on the same rows
    note: str = ""


@dataclass(frozen=True)
class BenchPreset:
    """A full grid: methods x learning rates x datasets x splits x seeds, plus centralized baselines."""

    name: str
    description: str
    methods: tuple[str, ...]
    lrs: dict[str, tuple[float, ...]]
    datasets: tuple[BenchDataset, ...]
    seeds: tuple[int, ...]
    clients: int
    rounds: int
    local_epochs: int
    batch_size: int
    num_virtual_tokens: int = 20
    lora_r: int = 8
    centralized: bool = True
    model: str = "minilm"
    virtual_init: str = "task"  # how soft prompts and prefixes start (method.prefix_init / prompt_init)
    notes: tuple[str, ...] = field(default_factory=tuple)
