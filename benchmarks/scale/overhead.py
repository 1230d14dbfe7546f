"""Embedded round time against a bare PyTorch+PEFT loop over the same rows, batches and length (issue 18, item 5).

    python benchmarks/scale/overhead.py            # prefix and LoRA, 10 clients, 6 rounds each

The bare loop does only what training needs: for each client, load the global trainable tensors into the model,
a fresh AdamW, the same batches (same seed, same loader), forward, backward, step; then the plain average. The
embedded round adds what a federated run does besides: encoding and decoding payloads, validation, the merge
through the strategy and server optimizer, the evaluation of the new global model on 16 rows. Writes
overhead.json beside this script (run.py puts it into report.md).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedcustom.config import build_config  # noqa: E402
from fedcustom.methods import load_trainable_state, trainable_state  # noqa: E402
from fedcustom.runner import build_job  # noqa: E402
from fedcustom.training import derive_seed, local_batches, make_optimizer  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"


def job_for(method: str, clients: int) -> object:
    return build_job(build_config({
        "model": {"name": "minilm", "max_length": 48},
        "data": {"dataset": str(DATA / "sst2/train.tsv"), "eval_dataset": str(DATA / "sst2/validation.tsv"),
                 "max_train_examples": 320, "max_eval_examples": 16, "partition": "iid"},
        "method": {"name": method}, "federation": {"clients": clients, "rounds": 6, "local_epochs": 1},
        "train": {"batch_size": 8, "count_flops": False, "lr_schedule": "constant"},
        "output": {"dir": f"/tmp/fedcustom-overhead/{method}", "quiet": True, "save_model": False, "checkpoint": False},
    }))


def bare_round(job: object, rnd: int, clients: int) -> float:
    """Seconds for one round of the bare loop: the same batches and dropout masks the clients draw (their seed is
    derived from the run's seed, the round and the client, as a TrainingClient derives it; batches padded to
    different lengths would cost differently)."""
    start = time.perf_counter()
    global_state, states = trainable_state(job.model), []
    for node in range(clients):
        load_trainable_state(job.model, global_state)
        params = [p for p in job.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, job.schedule)
        job.model.train()
        seed = derive_seed(job.cfg.train.seed, rnd, node)
        torch.manual_seed(seed)
        for batch in local_batches(job.data.client_table(node), job.tokenizer, job.schedule, seed):
            job.model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        states.append(trainable_state(job.model))
    load_trainable_state(job.model, {k: torch.stack([s[k] for s in states]).mean(0) for k in global_state})
    return time.perf_counter() - start


def embedded_round(job: object, rnd: int) -> float:
    """Seconds for one round of the embedded runtime (broadcast, local training, upload, validation, merge and
    the evaluation of the new global model)."""
    start = time.perf_counter()
    job.server.run_round(rnd)
    return time.perf_counter() - start


def measure(method: str, clients: int = 10, rounds: int = 6) -> dict:
    job = job_for(method, clients)
    job.server.evaluate_initial()
    embedded, bare = [], []
    for rnd in range(1, rounds + 1):  # interleaved, the first of each pair alternating, so load and warm caches
        if rnd % 2:                     # favour neither
            embedded.append(embedded_round(job, rnd))
            bare.append(bare_round(job, rnd, clients))
        else:
            bare.append(bare_round(job, rnd, clients))
            embedded.append(embedded_round(job, rnd))
    return {"method": method, "clients": clients, "rounds": rounds, "embedded_s": round(statistics.median(embedded), 3),
            "bare_s": round(statistics.median(bare), 3), "embedded_rounds": [round(x, 3) for x in embedded],
            "bare_rounds": [round(x, 3) for x in bare], "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "ratio": round(statistics.median(embedded) / statistics.median(bare), 3)}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = [measure(m) for m in ("prefix", "lora")]
    (HERE / "overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        print(f"{r['method']}: embedded {r['embedded_s']} s / round, bare {r['bare_s']} s / round, ratio {r['ratio']}")


if __name__ == "__main__":
    main()
