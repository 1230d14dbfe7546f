"""`fedcustom bench --preset leakage`: how much federated prefix tuning, LoRA and full fine-tuning leak about the
training rows, without DP and with client-level DP (DP-FedAvg, the server adds Gaussian noise to the clipped mean)
at several noise levels, measured by membership inference (fedcustom.attacks_mia).

Two targets per run: the final global model (what anyone who receives it sees), and one client's upload in the
next round (what an honest-but-curious server sees without secure aggregation). The seed paper names the first as
its open limitation ("the exchanged prefix vectors could still leak information"). The runs are made to overfit
(few rows per client, several local epochs), so that leakage is measurable at all on this budget."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console

from fedcustom.bench.report import machine_line
from fedcustom.bench.reuse import run_or_reuse
from fedcustom.bench.settings import Sst2Setting
from fedcustom.config import RunConfig
from fedcustom.errors import FedCustomError
from fedcustom.report import write_json

LEAKAGE_FILE = "leakage.json"
PLOT = "leakage_auc_vs_epsilon.png"
AUC_TARGET = 0.05  # the target: AUC within 0.05 of 0.5 ...
ACCURACY_BUDGET = 0.02  # ... at the smallest epsilon that costs at most 2 points of accuracy


@dataclass(frozen=True)
class LeakageSetting(Sst2Setting):
    """SST-2, 400 training rows over 10 clients (40 each), 3 rounds of 5 local epochs; 400 held-out rows are the
    non-members. Client-level DP: the server clips every update to the method's C and adds noise z * C / n."""

    max_train: int = 400
    max_eval: int = 400
    clients: int = 10
    rounds: int = 3
    local_epochs: int = 5
    batch_size: int = 16
    methods: tuple[tuple[str, float], ...] = (("prefix", 3e-2), ("lora", 5e-3), ("full", 1e-4))
    # DP clip norms: the median honest update norm of the robust preset for prefix (22) and LoRA (2.1); full
    # fine-tuning's is not measured there, 2.0 is a guess (a larger C only adds noise; a smaller one clips more)
    clip: tuple[tuple[str, float], ...] = (("prefix", 22.0), ("lora", 2.1), ("full", 2.0))
    # 0: no DP. With 10 clients z = 0.3 already takes every method to chance (the noise on the mean, z * C / 10 per
    # coordinate, outweighs the clipped updates), so 0.03 and 0.1 look for the point where accuracy holds
    noise: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)
    observed_client: int = 0


def run_config(s: LeakageSetting, method: str, lr: float, noise: float, data_dir: Path, out: Path) -> RunConfig:
    privacy = {"dp": "central", "clip_norm": dict(s.clip)[method], "noise_multiplier": noise} if noise else {}
    cfg = s.run_config(data_dir, out / "runs" / method / f"noise{noise:g}", {"name": method}, lr,
                       train={"count_flops": False}, privacy=privacy)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_eval_examples=s.max_eval))


def measure(job: Any, setting: LeakageSetting) -> dict[str, Any]:
    """Both attacks against the final global model and against one client's next upload; the model is left as the
    run left it (the final global state)."""
    from fedcustom.attacks_mia import attacks, per_example_losses
    from fedcustom.methods import load_trainable_state, trainable_state

    model, data, tokenizer, batch = job.model, job.data, job.tokenizer, job.eval_batch
    final = trainable_state(model)
    node = setting.observed_client
    client_rows = data.client_table(node)

    def losses() -> dict[str, np.ndarray]:
        return {"members": per_example_losses(model, data.train, tokenizer, batch),
                "client": per_example_losses(model, client_rows, tokenizer, batch),
                "non_members": per_example_losses(model, data.eval, tokenizer, batch)}

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


def _record(method: str, noise: float, setting: LeakageSetting, folder: Path, summary: dict[str, Any],
            reused: bool) -> dict[str, Any]:
    log = [json.loads(line) for line in (folder / "round_log.jsonl").read_text().splitlines()]
    return {"method": method, "noise": noise, "clip": dict(setting.clip)[method] if noise else None,
            "accuracy": summary["final_accuracy"], "epsilon": log[-1].get("epsilon"),
            "leakage": json.loads((folder / LEAKAGE_FILE).read_text()), "reused": reused,
            "wall_seconds": summary.get("wall_seconds")}


def _finished(cfg: RunConfig) -> dict[str, Any] | None:
    """The summary of a finished, measured run with this config, else None."""
    from fedcustom.bench.reuse import same_config

    folder = Path(cfg.output.dir)
    path = folder / "summary.json"
    if not (path.is_file() and (folder / LEAKAGE_FILE).is_file()):
        return None
    summary = json.loads(path.read_text())
    return summary if same_config(summary.get("config"), cfg) else None


def run_leakage(data_dir: Path, out: Path, console: Console, setting: LeakageSetting = LeakageSetting(),
                stages: list[str] | None = None) -> list[dict[str, Any]]:
    """Every (method, noise) run, reusing finished ones; with ``stages`` (method names) only those methods' missing
    runs are run, and the other methods' finished runs are reported as they are (``report``: run nothing)."""
    for rel in (setting.train, setting.eval):
        if not (data_dir / rel).is_file():
            raise FedCustomError(f"benchmark data {data_dir / rel}: not found; expected the shared data folder")
    methods = [m for m, _ in setting.methods]
    unknown = sorted(set(stages or []) - set(methods) - {"report"})
    if unknown:
        raise FedCustomError(f"--stage {', '.join(unknown)}: the leakage preset's stages are its methods "
                             f"({', '.join(methods)}), or report (run nothing, report the finished runs)")
    records = []
    todo = [(m, lr, z) for m, lr in setting.methods for z in setting.noise]
    for i, (method, lr, noise) in enumerate(todo, 1):
        cfg = run_config(setting, method, lr, noise, data_dir, out)
        folder = Path(cfg.output.dir)
        if stages and method not in stages:
            summary = _finished(cfg)
            if summary is not None:
                records.append(_record(method, noise, setting, folder, summary, True))
            continue

        def instrument(job: Any) -> Any:
            return lambda _summary: write_json(folder / LEAKAGE_FILE, measure(job, setting))

        start = time.perf_counter()
        summary, reused = run_or_reuse(cfg, complete=lambda _s: (folder / LEAKAGE_FILE).is_file(),
                                       instrument=instrument)
        records.append(_record(method, noise, setting, folder, summary, reused))
        console.print(f"[{i}/{len(todo)}] {method} noise {noise:g}: accuracy {summary['final_accuracy']:.3f}, "
                      f"global AUC {records[-1]['leakage']['global_model']['reference_ratio']['auc']:.3f}"
                      f"{' (reused)' if reused else ''} ({time.perf_counter() - start:.0f} s)")
    if not records:
        raise FedCustomError("no leakage run has finished yet: run the preset without --stage first")
    return records


def targets(records: list[dict[str, Any]]) -> list[str]:
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


def _missing_lines(records: list[dict[str, Any]]) -> list[str]:
    """A line naming the grid's runs this report lacks (a preset run in parts), else nothing."""
    setting = LeakageSetting()
    have = {(r["method"], r["noise"]) for r in records}
    missing = [f"{m} noise {z:g}" for m, _ in setting.methods for z in setting.noise if (m, z) not in have]
    return [f"Not run yet (the report covers the finished runs): {', '.join(missing)}.", ""] if missing else []


def _cell(result: dict[str, Any]) -> str:
    return f"{result['auc']:.3f} / {result['tpr_at_1pct_fpr']:.3f}"


def write_report(out: Path, records: list[dict[str, Any]], result: dict[str, Any]) -> None:
    first = records[0]["leakage"]
    counts = {"global_model": first["global_model"]["loss_threshold"]["members"],
              "client_update": first["client_update"]["loss_threshold"]["members"],
              "non_members": first["global_model"]["loss_threshold"]["non_members"]}
    lines = ["# fedcustom bench — preset `leakage`", "", __doc__.split("\n\n")[0].replace("\n", " "), "",
             f"Command: `{result['command']}`  ", f"Machine: {machine_line(result['machine'])}; "
             f"{result['wall_seconds']:.0f} s "
             f"({result['reused']} of {len(records)} runs reused); finished {result['finished']}.", "",
             *_missing_lines(records), 
             f"Each cell: ROC AUC / TPR at 1% FPR. Global model: the {counts['global_model']} training rows against "
             f"{counts['non_members']} held-out rows. One client's upload: client 0's {counts['client_update']} rows "
             f"against the same held-out rows, from the state it uploads in the round after the last (the server "
             f"decodes it before any noise: central DP adds noise to the mean). Epsilon: client-level, at delta "
             f"1e-5, after the last round.", "",
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
    (out / "report.md").write_text("\n".join(lines))


def run_leakage_bench(data_dir: str, out: Path, command: str, console: Console,
                      stages: list[str] | None = None) -> dict[str, Any]:
    from datetime import datetime, timezone

    from fedcustom.bench.report import machine
    from fedcustom.summary import versions

    start = time.perf_counter()
    records = run_leakage(Path(data_dir).expanduser(), out, console, stages=stages)
    result = {"preset": "leakage", "command": command, "machine": machine(), "versions": versions(),
              "wall_seconds": time.perf_counter() - start, "reused": sum(r["reused"] for r in records),
              "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "records": records}
    result["targets"] = targets(records)
    write_json(out / "results.json", result)
    plot(records, out / PLOT)
    write_report(out, records, result)
    console.print(f"report: {out / 'report.md'}")
    return result
