"""Report of the grid sweeps `quick`, `paper` and `tune` (sweeps/{quick,paper,tune}.toml): the comparison table of
*Federated Customization of Large Models* (arXiv 2601.00526).

Federated full fine-tuning, LoRA, prompt tuning and prefix tuning, each against its own centralized baseline with
the same number of example passes, on SST-2 (accuracy on GLUE's validation split) and on AG News under IID and
Dirichlet label skew. A grid sweep has the axes dataset (tags: title, note), seed (tag: number), variant (tags:
method, lr) and split (tag: partition), and one stage per dataset naming its splits; its IID split trains the
centralized baseline where the sweep sets ``train.centralized`` (the rate grid ``tune`` does not).
Every run also measures one training step's FLOPs against one forward pass of the bare backbone
(:func:`instrument`). The numbers go through :mod:`fedcustom.bench.report` (rows, tables, targets, diagnostics).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcustom.bench.cells import add_to_summary
from fedcustom.bench.plots import accuracy_vs_alpha, accuracy_vs_megabytes, accuracy_vs_round
from fedcustom.bench.presets import BenchDataset, BenchPreset
from fedcustom.bench.report import (best_rates, build_rows, diagnostics, main_table, paper_table, skew_dataset,
                                    skew_table, targets as row_targets, variants)
from fedcustom.bench.sweep import Sweep, base_value, preamble
from fedcustom.config import MethodConfig

CELL_KEYS = (
    "final_accuracy", "final_macro_f1", "centralized_accuracy", "centralized_macro_f1", "accuracy_per_round",
    "round_wall_seconds", "bytes_up_per_round", "bytes_down_per_round", "client_flops_per_round",
    "trainable_params", "trainable_bytes_fp32", "total_params", "train_examples", "eval_examples", "wall_seconds",
    "learning_rate", "rejected_updates", "centralized", "client_data", "flops_vs_forward",
)
PLOTS = {"accuracy_vs_round": "accuracy_vs_round.png", "accuracy_vs_mb": "accuracy_vs_mb.png",
         "accuracy_vs_alpha": "accuracy_vs_alpha.png"}


def forward_flops_ratio(job: Any) -> float:
    """FLOPs of one training step of the method / FLOPs of one forward pass of the bare frozen
    backbone, both counted on the same batch of evaluation rows (the paper's compute unit)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedcustom.data import make_loader

    batch = next(iter(make_loader(job.data.test.table, job.tokenizer, job.cfg.train.batch_size, seed=None)))
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


def instrument(job: Any, folder: Path) -> Callable[[dict[str, Any]], None]:
    """Before the rounds, on the untrained model: the step / forward FLOPs ratio; after them, added to the summary."""
    ratio = forward_flops_ratio(job)
    return lambda summary: add_to_summary(folder, summary, {"flops_vs_forward": ratio})


def complete(folder: Path, summary: dict[str, Any]) -> bool:
    """A finished run counts only with its FLOPs ratio."""
    return "flops_vs_forward" in summary


def flat(records: list[dict]) -> list[dict[str, Any]]:
    """The sweep's records as the grid's cells: dataset, method, rate, split, seed and the run's numbers."""
    return [{"dataset": r["labels"]["dataset"], "method": r["tags"]["method"], "lr": r["tags"]["lr"],
             "split": r["tags"]["partition"], "seed": r["tags"]["number"], "run_dir": r["run_dir"], "reused": r["reused"],
             **{k: r["summary"].get(k) for k in CELL_KEYS}} for r in records]


def preset_of(sweep: Sweep) -> BenchPreset:
    """The grid a sweep describes, in the form the tables and diagnostics of fedcustom.bench.report read."""
    variants_ = sweep.axes["variant"]
    methods = tuple(dict.fromkeys(v.tags["method"] for v in variants_))
    splits_of = {}
    for stage in sweep.stages:
        for key in stage.only.get("dataset", [v.label for v in sweep.axes["dataset"]]):
            labels = stage.only.get("split", [v.label for v in sweep.axes["split"]])
            splits_of[key] = tuple(v.tags["partition"] for v in sweep.axes["split"] if v.label in labels)
    datasets = []
    for v in sweep.axes["dataset"]:
        data, model = v.settings.get("data", {}), v.settings.get("model", {})
        datasets.append(BenchDataset(
            v.label, v.tags.get("title", v.label), data.get("dataset", ""), data.get("eval_dataset"),
            splits_of.get(v.label, ()), data.get("max_train_examples"), data.get("max_eval_examples"),
            model.get("max_length", base_value(sweep, "model.max_length")), data.get("eval_fraction", 0.2),
            data.get("split_seed", 0), v.tags.get("note", "")))
    b = lambda key, default=None: default if base_value(sweep, key) is None else base_value(sweep, key)  # noqa: E731
    return BenchPreset(
        name=sweep.name, description=sweep.description, methods=methods,
        lrs={m: tuple(v.tags["lr"] for v in variants_ if v.tags["method"] == m) for m in methods},
        datasets=tuple(d for d in datasets if d.splits),
        seeds=tuple(v.tags["number"] for v in sweep.axes["seed"]),
        clients=b("federation.clients"), rounds=b("federation.rounds"), local_epochs=b("federation.local_epochs"),
        batch_size=b("train.batch_size"), num_virtual_tokens=b("method.num_virtual_tokens", 20),
        lora_r=b("method.lora_r", 8), model=b("model.name", "minilm"),
        virtual_init=b("method.prefix_init", MethodConfig.prefix_init),
        centralized=any(v.settings.get("train", {}).get("centralized") for v in sweep.axes["split"]))


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """Not used for a grid's report (its targets need the preset, see :func:`report`)."""
    return []


def _setup_lines(preset: BenchPreset) -> list[str]:
    backbone = " (packaged all-MiniLM-L6-v2 encoder)" if preset.model == "minilm" else ""
    lines = [f"- Model: `{preset.model}`{backbone}; {preset.clients} clients, all sampled "
             f"every round; {preset.rounds} rounds of {preset.local_epochs} local epoch(s); batch {preset.batch_size}; "
             f"AdamW; seeds {', '.join(map(str, preset.seeds))}.",
             f"- Methods: prompt/prefix with {preset.num_virtual_tokens} virtual tokens, LoRA rank {preset.lora_r}; "
             "learning rates " + ", ".join(f"{m} {'/'.join(f'{lr:g}' for lr in preset.lrs[m])}" for m in preset.methods)
             + f" (see `fedcustom/bench/sweeps/{preset.name}.toml` for how they were chosen).",
             "- Centralized baseline: same model, method, optimizer and learning rate, trained on the union of the "
             "clients' rows for the same number of example passes as the federated run." if preset.centralized else
             "- No centralized baseline: this sweep sets `train.centralized = false`."]
    for ds in preset.datasets:
        lines.append(f"- {ds.title}: {ds.max_train} training rows, {ds.max_eval or 'all'} evaluation rows, "
                     f"max {ds.max_length} tokens, splits {', '.join(ds.splits)}. {ds.note}")
    return lines


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md: setup, the main table, label skew, the paper's rows (or the selected rates of a rate grid),
    targets with the diagnostics of their misses, and the plots. Adds the rows and targets to ``result``."""
    preset = preset_of(sweep)
    records = flat([r for stage in stages.values() for r in stage])
    if not records:
        return "\n".join([*preamble(sweep, result), "No run has finished yet.", ""])
    rows = build_rows(records, preset)
    result["rows"], result["targets"] = rows, row_targets(rows)
    main = preset.datasets[0]
    accuracy_vs_round(records, main.key, main.splits[0], out / PLOTS["accuracy_vs_round"])
    accuracy_vs_megabytes(records, main.key, main.splits[0], out / PLOTS["accuracy_vs_mb"])
    skew = skew_dataset(preset)
    if skew:
        accuracy_vs_alpha(records, skew, next(d.splits for d in preset.datasets if d.key == skew),
                          out / PLOTS["accuracy_vs_alpha"])
    many = len(variants(records)) > len(preset.methods)
    parts = [*preamble(sweep, result), "## Setup", "", *_setup_lines(preset), "",
             f"## Results ({main.title}, {main.splits[0]}; mean ± std over {len(preset.seeds)} seed(s))", "",
             "Accuracy is the final global model's; the gap is federated minus centralized, paired by seed. Bytes are "
             "the encoded payload per client per round (trainable tensors incl. the classification head). Client "
             "FLOPs are counted with torch's FlopCounterMode; × backbone forward is one training step's FLOPs over "
             "one forward pass of the frozen backbone on the same batch.", "", main_table(rows, many), ""]
    if skew:
        parts += [f"## Label skew ({next(d.title for d in preset.datasets if d.key == skew)})", "",
                  skew_table(rows, many), "", f"![accuracy vs alpha]({PLOTS['accuracy_vs_alpha']})", ""]
    if many:
        parts += ["## Selected learning rates", "", "The rate with the highest final accuracy per method:", "",
                  *[f"- {m}: {lr:g}" for m, lr in best_rates(rows).items()], ""]
    else:
        parts += ["## Against the paper (arXiv 2601.00526; uploads from FedPETuning, ACL 2023)", "",
                  "The paper's communication column is for a much larger model; compare ratios between methods, "
                  "not absolute sizes.", "", paper_table(rows), ""]
    parts += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    parts += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    if any(not t["met"] for t in result["targets"]):
        parts += ["", "### What the measurements say about the misses", "", *diagnostics(records, preset)]
    parts += ["", "## Plots", "", f"![accuracy vs round]({PLOTS['accuracy_vs_round']})",
              f"![accuracy vs MB]({PLOTS['accuracy_vs_mb']})", "",
              "Every number, per seed and per round, is in `results.json`; each run's round log and summary are "
              "under `runs/`.", ""]
    return "\n".join(parts)
