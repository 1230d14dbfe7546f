"""summary.json: the headline numbers of a finished run, with what produced them (config, library versions,
machine)."""

from __future__ import annotations

import math
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcustom.centralized import gaps
from fedcustom.codecs import get_codec
from fedcustom.config import RunConfig
from fedcustom.convergence import EarlyStop
from fedcustom.data import FederatedData
from fedcustom.device import model_device, peak_memory_mb
from fedcustom.methods import get_method
from fedcustom.protocols import protocol_of
from fedcustom.report import TASK_METRICS, mean
from fedcustom.rounds import RoundResult
from fedcustom.trust import clients_per_round, trust_summary


def early_stop_summary(stop: EarlyStop | None, results: list[RoundResult], rounds: int) -> dict[str, Any] | None:
    """Whether the run stopped before its last configured round, when, and its best round."""
    if stop is None:
        return None
    best = stop.best_round(results)
    return {"metric": stop.metric, "patience": stop.patience, "min_delta": stop.min_delta, "min_rounds": stop.min_rounds,
            "stopped": results[-1].round < rounds, "last_round": results[-1].round, "best_round": best,
            f"best_{stop.metric}": next(r.eval[stop.metric] for r in results if r.round == best),
            # the saved model and the final_* figures are the last round's: the best round is picked on the
            # evaluation rows, so keeping its model would report a number selected on the test set
            "saved_round": results[-1].round}


def source_commit() -> str | None:
    """The git commit of the fedcustom source this process runs, with ``+dirty`` when its tracked files under src/
    differ from that commit; None outside a git checkout (an installed wheel) or without git. Benchmarks reuse
    finished runs across sessions, so a result must say which code produced it, not only the package version."""
    root = Path(__file__).resolve().parents[2]  # src/fedcustom/summary.py -> the checkout (or a worktree)
    if not (root / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                                  check=True).stdout.strip()
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    """Library versions, the source commit and machine, so a result says what produced it."""
    libs = {name: version(name) for name in ("fedcustom", "torch", "transformers", "peft", "datasets", "flwr-datasets")}
    return {**libs, "fedcustom_commit": source_commit(), "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "cpu_threads": str(torch.get_num_threads())}


def client_eval_summary(cfg: RunConfig, results: list[RoundResult]) -> dict[str, Any]:
    """Per-client evaluation of the final global model (``client_<metric>``: client id -> its held-out score) with
    the mean, standard deviation and worst 10% over clients, and the mean per round; with --personalize the same
    for each client's own model (``client_<metric>_personal``...); empty when it is off."""
    if not results[-1].client_eval:
        return {}
    from fedcustom.tasks import get_task

    metric = get_task(cfg.model.task).headline_metric
    out = _per_client(f"client_{metric}", [r.client_eval for r in results])
    if results[-1].client_eval_personal:
        out.update(_per_client(f"client_{metric}_personal", [r.client_eval_personal for r in results]))
    return out


def _per_client(key: str, per_round: list[dict[int, float]]) -> dict[str, Any]:
    from fedcustom.report import client_eval_stats

    final = per_round[-1]
    return {key: {str(c): v for c, v in sorted(final.items())}, **client_eval_stats(final, key),
            f"{key}_mean_per_round": [client_eval_stats(r)["client_eval_mean"] if r else None for r in per_round]}


def time_summary(cfg: RunConfig, results: list[RoundResult]) -> dict[str, Any]:
    """Simulated device time (--client-profiles): per round and in all; and with --target-accuracy, the round in
    which the global headline metric first reached the target, with the wall-clock (and simulated) seconds until
    then (``time_to_target``; None values when it never did)."""
    out: dict[str, Any] = {}
    rounds = results[1:]
    simulated = [r.simulated_seconds for r in rounds]
    if any(s is not None for s in simulated):
        out["simulated_seconds_per_round"] = simulated
        out["simulated_seconds_total"] = sum(s or 0.0 for s in simulated)
    target = cfg.federation.target_accuracy
    if target is not None:
        metric = TASK_METRICS[cfg.model.task][0][0]
        reached = next((i for i, r in enumerate(rounds) if r.eval.get(metric, -math.inf) >= target), None)
        done = rounds[: reached + 1] if reached is not None else []
        out["time_to_target"] = {
            "metric": metric, "target": target, "round": rounds[reached].round if reached is not None else None,
            "wall_seconds": sum(r.wall_seconds for r in done) if reached is not None else None,
            "simulated_seconds": sum(r.simulated_seconds or 0.0 for r in done)
            if reached is not None and "simulated_seconds_total" in out else None}
    return out


def summarize(
    cfg: RunConfig, results: list[RoundResult], baselines: dict[str, dict[str, Any]],
    model: nn.Module, initial: dict[str, torch.Tensor], data: FederatedData, wall: float, settings: dict[str, Any],
    client_data: list[dict], stop: EarlyStop | None = None,
) -> dict[str, Any]:
    """The headline numbers (per client per round unless a key says total)."""
    rounds = results[1:]
    metrics = {}
    same, converged = baselines.get("same_passes"), baselines.get("converged")
    for key, _ in TASK_METRICS[cfg.model.task]:
        metrics.update({f"initial_{key}": results[0].eval[key], f"final_{key}": results[-1].eval[key],
                        f"{key}_per_round": [r.eval[key] for r in results],  # index 0 = the initial model
                        f"centralized_{key}": same[key] if same else None,
                        f"centralized_converged_{key}": converged[key] if converged else None})
    headline = TASK_METRICS[cfg.model.task][0][0]
    up = [b for r in rounds for b in r.bytes_up.values() if b > 0]  # 0: no reply (failed, timed out)
    down = [b for r in rounds for b in r.bytes_down.values()]
    flops = [f for r in rounds for f in r.client_flops.values()]
    server_flops = [f for r in rounds for f in r.server_flops.values()]
    trainable = sum(t.numel() for t in initial.values())
    return {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "partition": cfg.data.partition,
        "clients": cfg.federation.clients,
        "clients_per_round": clients_per_round(cfg),
        "rounds": len(rounds),
        "learning_rate": settings["client_lr"],
        "settings": settings,  # the training settings after the method's recommended defaults were filled in
        "task": cfg.model.task,
        **metrics,
        **gaps(results[-1].eval[headline], same, converged, headline),
        "early_stop": early_stop_summary(stop, results, cfg.federation.rounds),
        "round_wall_seconds": [r.wall_seconds for r in rounds],
        "centralized": same,
        "centralized_converged": converged,
        "bytes_up_per_round": mean(up),
        "bytes_down_per_round": mean(down),
        "bytes_up_total": sum(up),
        # per-client evaluation's messages (the raw global model to every node each round, and the replies): traffic
        # beside the training exchange's, which the per-round figures above count
        "bytes_eval_total": sum(b for r in results for b in r.bytes_eval.values()),  # round 0 included
        "bytes_down_total": sum(down),
        # all clients, both directions, each round (rounds differ: a delta codec's first download is dense)
        "bytes_per_round_all_clients": [sum(r.bytes_up.values()) + sum(r.bytes_down.values()) for r in rounds],
        "payload_note": protocol_of(get_method(cfg.method.name)).payload_note,
        "codec_up": str(getattr(get_codec(cfg.codec.up), "name", cfg.codec.up)),
        "codec_down": str(getattr(get_codec(cfg.codec.down or cfg.codec.up), "name", cfg.codec.down or cfg.codec.up)),
        "client_flops_per_round": mean(flops) if cfg.train.count_flops else None,  # None: not measured
        "server_flops_per_round": mean(server_flops) if server_flops else None,  # per client served (split, distill)
        "public_examples": len(data.public) if data.public else None,
        "trainable_params": trainable,
        "trainable_bytes_fp32": sum(t.numel() * 4 for t in initial.values()),
        "total_params": sum(p.numel() for p in model.parameters()),
        "rejected_updates": sum(len(r.rejected) for r in rounds),
        **client_eval_summary(cfg, results),
        **time_summary(cfg, results),
        "strategy": cfg.federation.strategy,
        **trust_summary(cfg, results),
        "wall_seconds": wall,
        "device": str(model_device(model)),
        "torch_threads": torch.get_num_threads(),  # this run's process (a bench worker's share of the cores)
        **peak_memory_mb(model_device(model)),  # this process's peak so far (the server's, plus in-process clients)
        "train_examples": sum(len(rows) for rows in data.client_indices),
        "eval_examples": len(data.test),
        "label_names": data.label_names,
        "client_data": client_data,
        "config": cfg.to_dict(),
        "versions": versions(),
    }
