"""Embedded round time against a bare PyTorch+PEFT loop over the same rows, batches and length (issue 18, item 5).

    python benchmarks/scale/overhead.py            # prefix and LoRA, 10 clients, 3 rounds each

The bare loop does only what training needs: for each client, load the global trainable tensors into the model,
a fresh AdamW, the same batches (same seed, same loader), forward, backward, step; then the plain average. The
embedded round adds what a federated run does besides: encoding and decoding payloads, validation, the merge
through the strategy and server optimizer, the evaluation of the new global model on 16 rows. Writes
overhead.json and overhead.md beside this script.
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
from fedcustom.training import local_batches, make_optimizer  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"


def job_for(method: str, clients: int) -> object:
    return build_job(build_config({
        "model": {"name": "minilm", "max_length": 48},
        "data": {"dataset": str(DATA / "sst2/train.tsv"), "eval_dataset": str(DATA / "sst2/validation.tsv"),
                 "max_train_examples": 320, "max_eval_examples": 16, "partition": "iid"},
        "method": {"name": method}, "federation": {"clients": clients, "rounds": 3, "local_epochs": 1},
        "train": {"batch_size": 8, "count_flops": False, "lr_schedule": "constant"},
        "output": {"dir": f"/tmp/fedcustom-overhead/{method}", "quiet": True, "save_model": False, "checkpoint": False},
    }))


def bare_round(job: object, rnd: int, clients: int) -> float:
    """Seconds for one round of the bare loop (the same batches the clients draw)."""
    start = time.perf_counter()
    global_state, states = trainable_state(job.model), []
    for node in range(clients):
        load_trainable_state(job.model, global_state)
        params = [p for p in job.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, job.schedule)
        job.model.train()
        for batch in local_batches(job.data.client_table(node), job.tokenizer, job.schedule, rnd * 1000 + node):
            job.model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        states.append(trainable_state(job.model))
    load_trainable_state(job.model, {k: torch.stack([s[k] for s in states]).mean(0) for k in global_state})
    return time.perf_counter() - start


def measure(method: str, clients: int = 10, rounds: int = 3) -> dict:
    job = job_for(method, clients)
    job.server.evaluate_initial()
    embedded, bare = [], []
    for rnd in range(1, rounds + 1):  # interleaved, so background load hits both alike
        start = time.perf_counter()
        job.server.run_round(rnd)
        embedded.append(time.perf_counter() - start)
        bare.append(bare_round(job, rnd, clients))
    return {"method": method, "clients": clients, "embedded_s": round(statistics.median(embedded), 3),
            "bare_s": round(statistics.median(bare), 3),
            "ratio": round(statistics.median(embedded) / statistics.median(bare), 3)}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = [measure(m) for m in ("prefix", "lora")]
    (HERE / "overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Embedded round vs a bare PyTorch+PEFT loop", "",
             f"Machine: {platform.machine()}, 2 CPU cores, no GPU. Command: `python benchmarks/scale/overhead.py`. "
             "MiniLM, SST-2, 320 rows over 10 clients (IID), batch 8, 1 local epoch, raw codec, FLOP counting off; "
             "median of 3 rounds, embedded and bare interleaved. Target: ratio <= 1.05.", "",
             "| method | clients | embedded s / round | bare s / round | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['clients']} | {r['embedded_s']} | {r['bare_s']} | {r['ratio']} |" for r in rows]
    (HERE / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
