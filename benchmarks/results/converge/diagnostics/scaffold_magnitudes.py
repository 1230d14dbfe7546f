"""A SCAFFOLD report cell run again with its control variates measured (a diagnosis, not a cell of the sweep).

    PYTHONPATH=src python benchmarks/results/converge/diagnostics/scaffold_magnitudes.py SUMMARY_JSON OUT_DIR [ROUNDS] [weighted]

Trains the cell of SUMMARY_JSON (a finished SCAFFOLD run's summary.json) unchanged and, for every client update,
appends one line to OUT_DIR/controls.jsonl with root-mean-square sizes over all trainable coordinates (lr: the
round's client rate, K: the client's local steps):

    mean_step   (x - y_i) / (K lr): the client's average step in units of lr (AdamW: about 1 at most)
    c_i, c      the client's and the server's control variates as the client received them
    correction  c - c_i, added to every one of the K steps
    moved       x - y_i, the client's whole displacement this round
    pushed      K lr (c - c_i), the part of that displacement the correction contributed
    pushed_cos  cosine between the correction's push, -K lr (c - c_i), and the displacement y_i - x

After each round it also appends a "server" line: the size of c and of the example-weighted mean of the
clients' c_i (what c would be if it were averaged with the model's own weights). Stops after ROUNDS rounds
(default 3). With ``weighted`` the run uses ``--scaffold-weights examples``: the server's c moves by
``sum_i (n_i / n) (c_i+ - c_i)`` (the clients' changes weighted by their examples, as the model is merged) instead
of the paper's ``(1/N) sum_i``, a test of whether the unweighted mean is what fails on uneven clients (every client
trains every round in these cells, so the two agree when the clients are of equal size). The committed weighted
run was made with an equivalent patch of ``ServerControl.apply`` before the option existed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from fedcustom import scaffold
from fedcustom.config import build_config
from fedcustom.launch import run
from fedcustom.protocols.sharing.client import TrainingClient


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in sorted(state)])


def _rms(v: torch.Tensor) -> float:
    return float(v.pow(2).mean().sqrt())


def main(summary: str, out: str, rounds: str = "3", mode: str = "uniform") -> None:
    recorded = json.load(open(summary))
    values = recorded["config"]
    sizes = [c["examples"] for c in recorded["client_data"]]
    values["output"].update(dir=out, quiet=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    log = open(Path(out) / "controls.jsonl", "w")
    calls: list[tuple[int, torch.Tensor]] = []  # this round's (client, c_i+)
    original = scaffold.client_update
    per_round = len(sizes)  # every client trains every round in these cells

    def measured(own, server, received, trained, steps, lr):
        new = original(own, server, received, trained, steps, lr)
        client = current[0]
        moved = _flat(received) - _flat(trained)
        correction = _flat(server) - _flat(own)
        pushed = steps * lr * correction
        cos = float(torch.dot(pushed, moved) / (pushed.norm() * moved.norm())) if pushed.norm() > 0 else math.nan
        line = {"client": client, "examples": sizes[client], "K": steps, "lr": lr,
                "mean_step": _rms(moved / (steps * lr)), "c_i": _rms(_flat(own)), "c": _rms(_flat(server)),
                "correction": _rms(correction), "moved": _rms(moved), "pushed": _rms(pushed), "pushed_cos": cos,
                "new_c_i": _rms(_flat(new))}
        log.write(json.dumps(line) + "\n")
        log.flush()
        calls.append((client, _flat(new)))
        if len(calls) == per_round:
            weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
            stacked = torch.stack([c for _, c in sorted(calls, key=lambda call: call[0])])
            log.write(json.dumps({"server": True, "uniform_mean_c_i": _rms(stacked.mean(0)),
                                  "weighted_mean_c_i": _rms((weights[:, None] * stacked).sum(0))}) + "\n")
            log.flush()
            calls.clear()
            done = sum(1 for line in open(Path(out) / "controls.jsonl") if '"server"' in line)
            if done >= int(rounds):
                raise SystemExit(0)
        return new

    current = [-1]  # the node whose update is being computed
    train = TrainingClient._train

    def training(self, node_id, message):
        current[0] = node_id
        return train(self, node_id, message)

    scaffold.client_update = measured
    if mode not in ("uniform", "weighted"):
        raise SystemExit(f"mode: expected 'uniform' or 'weighted', got {mode!r}")
    values["federation"]["scaffold_weights"] = "examples" if mode == "weighted" else "uniform"
    TrainingClient._train = training
    run(build_config({k: v for k, v in values.items() if isinstance(v, dict)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
