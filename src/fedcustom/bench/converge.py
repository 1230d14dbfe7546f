"""Report of the ``converge`` sweep: the paper's claims (arXiv 2601.00526) with every run at convergence.

Rows are (method, setting) means over the reported seeds with their standard errors; the gap to the converged
centralized baseline is paired by seed (the baseline runs once per corpus, method and seed, in the corpus' IID
cell, since it does not depend on how rows are split). Targets: prefix tuning within 0.5 points of that
baseline on SST-2 IID, and prefix tuning losing at most 1 point from AG News IID to Dirichlet 0.1. The
``all-rounds`` stage runs prefix tuning's AG News cells again without early stopping, to measure how much of the
skewed split's drop stopping early explains; the ``scaffold-examples`` stage runs the Dirichlet 0.1 cells with
SCAFFOLD's control variate weighted by examples, to measure how much of that drop the paper's uniform rule costs.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from fedcustom.bench.report import PAPER, fmt_mean
from fedcustom.bench.sweep import Sweep, picks_table, preamble
from fedcustom.config import TrainConfig

MB = 1e6
PLOTS = {"rounds": "accuracy_vs_round.png", "skew": "accuracy_by_split.png", "cost": "accuracy_vs_total_mb.png"}


def mean_se(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard error of the mean, count (NaN where there is nothing)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), se, len(values)


def fmt(stat: tuple[float, float, int], scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
    mean, se, _ = stat
    if math.isnan(mean):
        return "n/a"
    head = f"{mean * scale:+.{digits}f}" if sign else f"{mean * scale:.{digits}f}"
    return head if math.isnan(se) else f"{head} ± {se * scale:.{digits}f}"


def _runs(records: list[dict], **tags: Any) -> list[dict]:
    return [r for r in records if all(r["tags"].get(k) == v for k, v in tags.items())]


def _baseline(records: list[dict], record: dict) -> float | None:
    """The converged centralized accuracy for a run's corpus, method and seed (from the corpus' IID cell)."""
    t = record["tags"]
    for r in _runs(records, dataset=t["dataset"], method=t["method"], seed=t["seed"]):
        value = r["summary"].get("centralized_converged_accuracy")
        if value is not None:
            return value
    return None


def rows(records: list[dict]) -> list[dict[str, Any]]:
    """One row per (method, setting), in sweep order."""
    keys = list(dict.fromkeys((r["tags"]["method"], r["tags"]["setting"]) for r in records))
    out = []
    for method, setting in keys:
        runs = _runs(records, method=method, setting=setting)
        s = [r["summary"] for r in runs]
        base = [_baseline(records, r) for r in runs]
        gaps = [x["final_accuracy"] - b for x, b in zip(s, base) if b is not None]
        total_mb = [x["bytes_up_total"] / MB for x in s]  # every client, every round
        out.append({
            "method": method, "setting": setting, "dataset": runs[0]["tags"]["dataset"],
            "split": runs[0]["tags"]["split"], "variant": runs[0]["tags"].get("variant"),
            "accuracy": mean_se([x["final_accuracy"] for x in s]),
            "centralized": mean_se([b for b in base if b is not None]), "gap": mean_se(gaps),
            "rounds": mean_se([x["rounds"] for x in s]),
            "best_round": mean_se([(x.get("early_stop") or {}).get("best_round", math.nan) for x in s]),
            "mb_up": mean_se([x["bytes_up_per_round"] / MB for x in s]),
            "total_mb_up": mean_se(total_mb),
            "gflops": mean_se([x["client_flops_per_round"] / 1e9 for x in s]),
            "gflops_per_example": mean_se([_flops_per_example(x) for x in s]),
            "seeds": [r["tags"]["seed"] for r in runs],
        })
    return out


def _flops_per_example(summary: dict) -> float:
    """Client GFLOPs per training example pass (forward and backward), a compute unit independent of data size."""
    passes = sum(c["examples"] for c in summary["client_data"]) * summary["settings"]["local_epochs"]
    per_round = summary["client_flops_per_round"] * summary["clients_per_round"]
    return per_round / passes / 1e9 if passes else math.nan


def drops(records: list[dict], method: str, dataset: str, iid: str, skewed: str) -> tuple[float, float, int]:
    """Accuracy lost from the ``iid`` to the ``skewed`` split, paired by seed."""
    by_seed = {r["tags"]["seed"]: r["summary"]["final_accuracy"] for r in _runs(records, method=method, setting=iid)}
    pairs = [(by_seed[r["tags"]["seed"]], r["summary"]["final_accuracy"])
             for r in _runs(records, method=method, setting=skewed) if r["tags"]["seed"] in by_seed]
    return mean_se([a - b for a, b in pairs])


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """The two claims of the paper, measured."""
    prefix = next((r for r in rows(records) if r["method"] == "prefix" and r["setting"] == "sst2-iid"), None)
    out = []
    if prefix:
        gap = prefix["gap"]
        out.append({"target": "prefix tuning within 0.5 points of centralized training to convergence (SST-2 IID, "
                              "mean over seeds ± standard error)", "measured": f"{fmt(gap, sign=True)} points",
                    "met": bool(not math.isnan(gap[0]) and gap[0] * 100 >= -0.5)})
    drop = drops(records, "prefix", "ag_news", "ag_news-iid", "ag_news-dirichlet0.1")
    if drop[2]:
        out.append({"target": "prefix tuning loses at most 1 point from IID to Dirichlet 0.1 (AG News, paired by seed)",
                    "measured": f"{fmt(drop)} points", "met": bool(drop[0] * 100 <= 1.0)})
    return out


def results_table(result_rows: list[dict]) -> str:
    lines = ["| method | setting | picked | seeds | accuracy % | centralized (converged) % | gap (points) | rounds run | "
             "best round | MB up / client / round | MB up, all clients, whole run | client GFLOPs / round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result_rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['variant']} | {len(r['seeds'])} | {fmt(r['accuracy'])} "
                     f"| {fmt(r['centralized'])}"
                     f" | {fmt(r['gap'], sign=True)} | {fmt(r['rounds'], 1, 1)} | {fmt(r['best_round'], 1, 1)} "
                     f"| {fmt_mean(r['mb_up'], 3)} | {fmt(r['total_mb_up'], 1, 1)} | {fmt_mean(r['gflops'], 1)} |")
    return "\n".join(lines)


def skew_table(records: list[dict]) -> str:
    """Each split's mean over the seeds it has finished (their count in brackets: while the bench runs they differ
    between columns) and the drop, paired by seed, over the seeds both splits have."""
    settings = [s for s in dict.fromkeys(r["tags"]["setting"] for r in records) if s.startswith("ag_news")]
    lines = ["| method | " + " | ".join(f"{s} % [seeds]" for s in settings)
             + " | drop IID → Dirichlet 0.1 (points) [paired seeds] |", "|---|" + "---|" * (len(settings) + 1)]
    for method in dict.fromkeys(r["tags"]["method"] for r in records):
        stats = [mean_se([r["summary"]["final_accuracy"] for r in _runs(records, method=method, setting=s)])
                 for s in settings]
        drop = drops(records, method, "ag_news", "ag_news-iid", "ag_news-dirichlet0.1")
        lines.append(f"| {method} | " + " | ".join(f"{fmt(s)} [{s[2]}]" for s in stats) + f" | {fmt(drop)} [{drop[2]}] |")
    return "\n".join(lines)


ALL_ROUNDS = "all-rounds"
SKEW = ("ag_news-iid", "ag_news-dirichlet0.1")


def all_rounds_lines(stages: dict[str, list[dict]]) -> list[str]:
    """The AG News drop with early stopping (report stage) beside the same cells run for every round (all-rounds
    stage), per method that stage ran, each row over the seeds the all-rounds stage has finished (so both columns
    are the same seeds): final accuracy, the best round's, and the paired IID -> Dirichlet 0.1 drop."""
    full, early = stages.get(ALL_ROUNDS, []), stages.get("report", [])
    if not full:
        return []
    lines = ["## Early stopping and the skewed split (AG News)", "",
             "The report's runs stop once accuracy has not improved for the patience; here the same cells (same "
             "seeds, picks and rates) run every round, so the cosine rate schedule runs to its end. Each row is over "
             "the seeds the all-rounds runs have finished, the early-stopped columns over the same seeds; mean ± "
             "standard error, the drops paired by seed.", "",
             "| method | split | seeds | early stopping: rounds run | early stopping: final % | all rounds: final % "
             "| all rounds: best round | all rounds: best-round % |", "|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(r["tags"]["method"] for r in full))
    for method in methods:
        for setting in SKEW:
            ran = _runs(full, method=method, setting=setting)
            seeds = [r["tags"]["seed"] for r in ran]
            stopped = [r["summary"] for r in _runs(early, method=method, setting=setting) if r["tags"]["seed"] in seeds]
            summaries = [r["summary"] for r in ran]
            best = [max(x["accuracy_per_round"]) for x in summaries]
            lines.append(f"| {method} | {setting} | {', '.join(seeds) or '-'} "
                         f"| {fmt(mean_se([x['rounds'] for x in stopped]), 1, 1)} "
                         f"| {fmt(mean_se([x['final_accuracy'] for x in stopped]))} "
                         f"| {fmt(mean_se([x['final_accuracy'] for x in summaries]))} "
                         f"| {fmt(mean_se([x['accuracy_per_round'].index(b) for x, b in zip(summaries, best)]), 1, 1)} "
                         f"| {fmt(mean_se(best))} |")
    lines += ["", "| method | seeds with both splits | drop IID → Dirichlet 0.1, early stopping (points) "
              "| drop, all rounds (points) |", "|---|---|---|---|"]
    for method in methods:
        both = sorted(set.intersection(*({r["tags"]["seed"] for r in _runs(full, method=method, setting=s)}
                                         for s in SKEW)))
        paired = [r for r in early if r["tags"]["seed"] in both]
        lines.append(f"| {method} | {', '.join(both) or '-'} | {fmt(drops(paired, method, 'ag_news', *SKEW))} "
                     f"| {fmt(drops(full, method, 'ag_news', *SKEW))} |")
    return [*lines, ""]


SCAFFOLD_EXAMPLES = "scaffold-examples"


def scaffold_weights_lines(stages: dict[str, list[dict]]) -> list[str]:
    """The skewed split with SCAFFOLD's control variate moved by example-weighted changes (scaffold-examples stage)
    beside the report stage's uniform rule, per method, over the seeds the new stage has finished: final accuracy
    and the IID -> Dirichlet 0.1 drop, both paired by seed with the report stage's runs."""
    weighted, report = stages.get(SCAFFOLD_EXAMPLES, []), stages.get("report", [])
    if not weighted:
        return []
    iid, skewed = SKEW
    lines = ["## SCAFFOLD's control variate weighted by examples (AG News Dirichlet 0.1)", "",
             "The report's SCAFFOLD moves the server's control variate by the clients' changes with the paper's "
             "equal weights 1/N while the model merges them by examples; here the same cells (seeds, picks, rates) "
             "move it by example weights too (`--scaffold-weights examples`). A diagnosis: the targets table stays "
             "the report stage's. Mean ± standard error over the seeds this stage has finished; the uniform columns "
             "over the same seeds, the drops paired by seed with the report stage's IID runs.", "",
             "| method | seeds | uniform c: final % | weighted c: final % | drop IID → Dirichlet 0.1, uniform (points) "
             "| drop, weighted (points) |", "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["tags"]["method"] for r in weighted):
        ran = _runs(weighted, method=method, setting=skewed)
        seeds = [r["tags"]["seed"] for r in ran]
        uniform = [r for r in _runs(report, method=method, setting=skewed) if r["tags"]["seed"] in seeds]
        iid_runs = [r for r in _runs(report, method=method, setting=iid) if r["tags"]["seed"] in seeds]
        lines.append(f"| {method} | {', '.join(seeds)} "
                     f"| {fmt(mean_se([r['summary']['final_accuracy'] for r in uniform]))} "
                     f"| {fmt(mean_se([r['summary']['final_accuracy'] for r in ran]))} "
                     f"| {fmt(drops(iid_runs + uniform, method, 'ag_news', *SKEW))} "
                     f"| {fmt(drops(iid_runs + ran, method, 'ag_news', *SKEW))} |")
    return [*lines, ""]


def paper_table(result_rows: list[dict]) -> str:
    lines = ["| method | paper gap (points) | ours, SST-2 IID (points) | paper comm / round | ours MB up / round "
             "| paper client compute | ours GFLOPs / example pass |", "|---|---|---|---|---|---|---|"]
    for r in (x for x in result_rows if x["setting"] == "sst2-iid"):
        p = PAPER.get(r["method"], {})
        lines.append(f"| {r['method']} | {p.get('gap', '-')} | {fmt(r['gap'], sign=True)} | {p.get('comm', '-')} "
                     f"| {fmt_mean(r['mb_up'], 3)} | {p.get('compute', '-')} | {fmt(r['gflops_per_example'], 1, 2)} |")
    return "\n".join(lines)


def picks_lines(sweep: Sweep, stages: dict[str, list[dict]]) -> list[str]:
    stage = next((s for s in sweep.stages if s.pick), None)
    if stage is None or stage.pick.source not in stages:
        return []
    table = picks_table(stages[stage.pick.source], stage.pick)
    candidates = list(dict.fromkeys(label for row in table for label in row["scores"]))
    lines = ["| " + " | ".join(stage.pick.by) + " | " + " | ".join(f"{c} %" for c in candidates) + " | picked |",
             "|" + "---|" * (len(stage.pick.by) + len(candidates) + 1)]
    for row in table:
        scores = " | ".join(f"{100 * row['scores'][c]:.1f}" if c in row["scores"] else "-" for c in candidates)
        lines.append("| " + " | ".join(str(row[k]) for k in stage.pick.by) + f" | {scores} | {row['picked']} |")
    return lines


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md for the converge sweep (the plots are written beside it)."""
    records = stages.get("report", [])
    result_rows = rows(records)
    if records:
        plot(records, out)
    seeds = sorted({r["tags"]["seed"] for r in records})
    parts = [*preamble(sweep, result),
             "## Setup", "", *setup_lines(sweep, seeds), "",
             "## Targets", "", "| target | measured | met |", "|---|---|---|",
             *[f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]], "",
             "## Against the paper (arXiv 2601.00526)", "",
             "The paper's communication column is for a far larger model; compare ratios between methods.", "",
             paper_table(result_rows), "",
             "## Every method and setting (mean ± standard error over the seeds each row has finished)", "",
             results_table(result_rows), "",
             "## Label skew (AG News)", "", skew_table(records), "", f"![accuracy by split]({PLOTS['skew']})", "",
             *all_rounds_lines(stages),
             *scaffold_weights_lines(stages),
             "## Server optimizer and drift correction, picked on the tuning seed", "",
             "Final accuracy of each candidate on the tuning seed (not reported above); the best per method ran "
             "the reported seeds.", "", *picks_lines(sweep, stages), "",
             "## Plots", "", f"![accuracy vs round]({PLOTS['rounds']})", f"![accuracy vs MB]({PLOTS['cost']})", "",
             "Every number, per seed and per round, is in `results.json`; each run's round log and summary are under "
             "`runs/` (their summary.json and round_log.jsonl are committed, so that a later invocation reuses them).", ""]
    return "\n".join(parts)


def setup_lines(sweep: Sweep, seeds: list[str]) -> list[str]:
    base = sweep.base
    fed, data, train = base.get("federation", {}), base.get("data", {}), base.get("train", {})
    centralized = lambda key: train.get(key, getattr(TrainConfig, key))  # noqa: E731 - the sweep's or the default
    return [
        f"- Model `{base.get('model', {}).get('name')}`; {fed.get('clients')} clients, all sampled every round; "
        f"{data.get('max_train_examples')} training rows per run; {fed.get('local_epochs')} local epoch(s) per round, "
        f"batch {train.get('batch_size')}; at most {fed.get('rounds')} rounds, stopped once the global accuracy has "
        f"not improved by more than {fed.get('early_stop_min_delta')} for {fed.get('early_stop_patience')} rounds "
        f"{min_rounds(sweep)}(the reported accuracy is the last round's, not the best).",
        f"- Client rate schedule `{train.get('lr_schedule', 'cosine')}` over the rounds; client rates (AdamW) "
        f"{rates(sweep, 'lr')}; prefix and prompt initialisation and LoRA rank are the methods' defaults.",
        "- Centralized baseline: the same method on the union of the clients' rows, one epoch at a time at a constant "
        f"rate ({rates(sweep, 'centralized_lr')}: the rates measured best for centralized training in OFFLINE.md) "
        f"until the accuracy on a {centralized('centralized_val_fraction'):.0%} validation slice held out of that "
        f"union stops improving for {centralized('centralized_patience')} epochs (at most "
        f"{centralized('centralized_max_epochs')}); the best epoch is scored on the same test rows as the federated "
        "model. It runs once per corpus, method and seed, in the corpus' IID cell, and is the baseline of that "
        "corpus' skewed splits too (the same training rows, split otherwise).",
        "- SST-2: training rows drawn per seed from `sst2/train.tsv`; accuracy on the 872-row validation file. "
        "AG News: the 7,600-row file split with seed 0 into 6,000 rows to draw training rows from and 1,600 held "
        "out, of which a fixed 800 are scored.",
        f"- Reported seeds: {', '.join(seeds)}; {tuning(sweep)}",
    ]


def tuning(sweep: Sweep) -> str:
    """Where the report stage's picked axis (server optimizer / drift correction) was picked, as the sweep says."""
    report_stage = next((s for s in sweep.stages if s.name == "report"), None)
    pick = report_stage.pick if report_stage is not None else None
    source = next((s for s in sweep.stages if pick is not None and s.name == pick.source), None)
    if pick is None or source is None:
        return "nothing was picked on a tuning stage."
    labels = lambda axis: source.only.get(axis) or tuple(v.label for v in sweep.axes.get(axis, ()))  # noqa: E731
    seeds = [str(v.settings.get("train", {}).get("seed", v.label)) for v in sweep.axes.get("seed", ())
             if v.label in labels("seed")]
    per = " and ".join(pick.by)
    scope = (f"one pick per {per}, used on every setting" if "setting" not in pick.by else f"one pick per {per}")
    return (f"the {pick.axis} (server optimizer / drift correction) was picked by {pick.metric} on the "
            f"`{source.name}` stage's runs: seed {', '.join(seeds)}, setting {', '.join(labels('setting'))}, not "
            f"reported ({scope}).")


def min_rounds(sweep: Sweep) -> str:
    """The methods whose early stopping starts later (``federation.early_stop_min_rounds``), as text."""
    later = [f"{v.label} not before round {v.settings['federation']['early_stop_min_rounds']}"
             for v in sweep.axes.get("method", ()) if v.settings.get("federation", {}).get("early_stop_min_rounds")]
    return f"({'; '.join(later)}) " if later else ""


def rates(sweep: Sweep, key: str) -> str:
    """The ``train.<key>`` each method value of the sweep sets, as text."""
    return ", ".join(f"{v.label} {v.settings.get('train', {}).get(key, 'default')}" for v in sweep.axes.get("method", ()))


def plot(records: list[dict], out: Path) -> None:
    """Accuracy per round (SST-2 IID), accuracy by AG News split, accuracy against total upload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["tags"]["method"] for r in records))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        for i, r in enumerate(_runs(records, method=method, setting="sst2-iid")):
            ax.plot(r["summary"]["accuracy_per_round"], color=f"C{methods.index(method)}", alpha=0.7,
                    label=method if i == 0 else None)
    ax.set(xlabel="round", ylabel="accuracy", title="SST-2 IID: global accuracy per round (each seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["rounds"], dpi=120)
    plt.close(fig)
    settings = [s for s in dict.fromkeys(r["tags"]["setting"] for r in records) if s.startswith("ag_news")]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(settings))
    for j, setting in enumerate(settings):
        stats = [mean_se([r["summary"]["final_accuracy"] for r in _runs(records, method=m, setting=setting)])
                 for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], [s[0] for s in stats], width,
               yerr=[0 if math.isnan(s[1]) else s[1] for s in stats], label=setting.removeprefix("ag_news-"))
    ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(methods))], methods)
    ax.set(ylabel="final accuracy", title="AG News: accuracy by label skew", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["skew"], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        runs = _runs(records, method=method)
        ax.scatter([r["summary"]["bytes_up_total"] / MB for r in runs], [r["summary"]["final_accuracy"] for r in runs],
                   label=method)
    ax.set(xscale="log", xlabel="MB uploaded by all clients over the run", ylabel="final accuracy",
           title="Accuracy against communication to convergence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["cost"], dpi=120)
    plt.close(fig)
