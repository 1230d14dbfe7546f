"""The wire schema of a training message: its kind and the config keys a server writes and a client reads
(the round's local schedule, drift correction, local DP). Every protocol that sends local training uses it; the
parameter-sharing protocol also sends ``evaluate`` (per-client evaluation on a node's own held-out rows)."""

from __future__ import annotations

import dataclasses

from fedcustom.training import LocalSchedule

TRAIN = "train"
EVALUATE = "evaluate"  # score the global model (and this client's own) on the rows the client holds out
SAVE = "save"  # the run's end: a client writes its own model (private tensors in place) on its own machine
FINETUNE_STREAM = 7  # separates --personalize finetune:K's dropout and shuffling from the client's training seed


def schedule_to_config(schedule: LocalSchedule, seed: int, rnd: int | None = None) -> dict[str, int | float | bool | str]:
    """The round settings the server puts in a train message's config; ``rnd`` sets the rate of that round
    (warm-up and decay over the run), else the base rate."""
    config: dict[str, int | float | bool | str] = {
        "lr": schedule.lr if rnd is None else schedule.lr_at_round(rnd), "batch_size": schedule.batch_size,
        "epochs": schedule.epochs, "weight_decay": schedule.weight_decay, "count_flops": schedule.count_flops,
        "seed": seed,
    }
    if schedule.optimizer != "adamw":
        config["optimizer"] = schedule.optimizer
    if schedule.steps is not None:
        config["steps"] = schedule.steps
    if schedule.precision != "fp32":
        config["precision"] = schedule.precision
    return config


def client_eval_config(schedule: LocalSchedule, seed: int, finetune_steps: int = 0) -> dict[str, int | float | bool | str]:
    """What an evaluate message says: --personalize finetune:K's K local steps (at the client's base rate,
    constant, from the global model; nothing is sent or kept) before a client scores its own model."""
    tuned = dataclasses.replace(schedule, steps=finetune_steps or None, examples=None, decay="constant",
                                warmup_rounds=0, per_step=False)
    return {**schedule_to_config(tuned, seed), "finetune_steps": finetune_steps}


def drift_config(prox_mu: float, scaffold: bool) -> dict[str, float | bool]:
    """What a train message carries when clients correct their drift (FedProx, SCAFFOLD)."""
    config: dict[str, float | bool] = {"prox_mu": prox_mu} if prox_mu > 0 else {}
    if scaffold:
        config["scaffold"] = True
    return config


def dp_sgd_config(noise_multiplier: float, max_grad_norm: float, delta: float) -> dict[str, float]:
    """What a train message carries when clients train with DP-SGD (--dp-sgd)."""
    return {"dp_sgd_noise": noise_multiplier, "dp_sgd_clip": max_grad_norm, "dp_sgd_delta": delta}


def local_dp_config(clip_norm: float, noise_multiplier: float) -> dict[str, float]:
    """What a train message carries when clients must privatize their own updates (--dp local)."""
    return {"dp_clip": clip_norm, "dp_noise": noise_multiplier}


def schedule_from_config(config: dict) -> LocalSchedule:
    """Inverse of :func:`schedule_to_config`."""
    return LocalSchedule(
        lr=float(config["lr"]), batch_size=int(config["batch_size"]), epochs=int(config["epochs"]),
        steps=int(config["steps"]) if "steps" in config else None,
        weight_decay=float(config["weight_decay"]), count_flops=bool(config["count_flops"]),
        optimizer=str(config.get("optimizer", "adamw")), precision=str(config.get("precision", "fp32")),
    )
