"""Benchmark presets: which methods, data, splits and seeds `fedcustom bench` runs, and how hard.

The grid reproduces the comparison table of *Federated Customization of Large Models* (arXiv
2601.00526): federated full fine-tuning, LoRA, prompt tuning and prefix tuning, each against its
own centralized baseline with the same number of example passes, on SST-2 (accuracy on GLUE's
validation split) and on AG News under IID and Dirichlet label skew.

Learning rates come from the ``tune`` preset: the same grid of three rates per method (the same
tuning budget for every method), scored on a slice held out of SST-2 *train* — never on the
validation split the report is about. Its recorded output is in ``benchmarks/results/tune/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedcustom.errors import ConfigError


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
    notes: tuple[str, ...] = field(default_factory=tuple)


# Chosen with `fedcustom bench --preset tune` (benchmarks/results/tune/report.md): four rates per method
# (TUNE_LRS), one federated run each, scored on 500 rows held out of SST-2 train. Dev accuracy:
#   full   1e-5 .562  3e-5 .558  1e-4 .826  3e-4 .808
#   lora   3e-4 .558  1e-3 .558  3e-3 .822  1e-2 .812
#   prompt 1e-2 .558  3e-2 .558  1e-1 .734  3e-1 .558
#   prefix 3e-3 .558  1e-2 .566  3e-2 .728  1e-1 .572
# Every peak is inside its grid (a first grid of three rates had every best at the top edge, so each
# method got one more, higher rate: the same tuning budget for every method). With only 1,200
# example passes, the lower rates never leave the majority class (0.558).
PAPER_LRS: dict[str, tuple[float, ...]] = {"full": (1e-4,), "lora": (3e-3,), "prompt": (1e-1,), "prefix": (3e-2,)}
TUNE_LRS: dict[str, tuple[float, ...]] = {
    "full": (1e-5, 3e-5, 1e-4, 3e-4), "lora": (3e-4, 1e-3, 3e-3, 1e-2), "prompt": (1e-2, 3e-2, 1e-1, 3e-1),
    "prefix": (3e-3, 1e-2, 3e-2, 1e-1),
}
METHODS = ("full", "lora", "prompt", "prefix")

SST2_NOTE = ("SST-2 (GLUE): training rows drawn (stratified, per seed) from sst2/train.tsv; accuracy on the full "
             "872-row sst2/validation.tsv, as GLUE reports.")
AG_NOTE = ("AG News: the 7,600-row official test file split here, stratified with seed 0, into 6,000 training and "
           "1,600 held-out rows; training rows drawn per seed from the 6,000, evaluation on a fixed stratified "
           "subset of the 1,600.")


def _sst2(max_train: int, max_eval: int | None, max_length: int) -> BenchDataset:
    return BenchDataset("sst2", "SST-2", "sst2/train.tsv", "sst2/validation.tsv", ("iid",),
                        max_train, max_eval, max_length, note=SST2_NOTE)


def _ag_news(max_train: int, max_eval: int, max_length: int, splits: tuple[str, ...]) -> BenchDataset:
    return BenchDataset("ag_news", "AG News", "ag_news/ag_news_test.csv", None, splits,
                        max_train, max_eval, max_length, eval_fraction=1600 / 7600, note=AG_NOTE)


PRESETS: dict[str, BenchPreset] = {
    "quick": BenchPreset(
        name="quick",
        description="Smoke run of the whole pipeline (one seed, tiny subsets); numbers are not meaningful.",
        methods=METHODS, lrs=PAPER_LRS,
        datasets=(_sst2(64, 64, 32), _ag_news(64, 64, 32, ("iid", "dirichlet:0.1"))),
        seeds=(0,), clients=4, rounds=2, local_epochs=1, batch_size=8,
    ),
    "paper": BenchPreset(
        name="paper",
        description="The paper's table: 4 methods x (SST-2 IID; AG News IID, Dirichlet 1.0, 0.1) x 3 seeds, "
                    "each with its centralized baseline, sized for 60 minutes on 2 CPU cores.",
        methods=METHODS, lrs=PAPER_LRS,
        datasets=(_sst2(400, None, 48), _ag_news(400, 400, 40, ("iid", "dirichlet:1.0", "dirichlet:0.1"))),
        seeds=(0, 1, 2), clients=5, rounds=3, local_epochs=1, batch_size=8,
        notes=("Small subsets (400 training rows, 3 rounds of 1 local epoch, 5 clients, 1,200 example passes per "
               "run) so the 72 runs fit the 60-minute budget on 2 CPU cores; accuracies are far below full-data "
               "numbers and seed-to-seed noise is several points.",),
    ),
    "tune": BenchPreset(
        name="tune",
        description="Learning-rate selection: four rates per method on a slice held out of SST-2 train.",
        methods=METHODS, lrs=TUNE_LRS,
        datasets=(BenchDataset("sst2_dev", "SST-2 dev (held out of train)", "sst2/train.tsv", None, ("iid",),
                               400, 500, 48, eval_fraction=0.05, note="SST-2 train.tsv only; 5% held out with seed 0."),),
        seeds=(0,), clients=5, rounds=3, local_epochs=1, batch_size=8, centralized=False,
    ),
}


def get_preset(name: str) -> BenchPreset:
    """The preset called ``name``; a clear error lists the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"benchmark preset {name!r}: unknown; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
