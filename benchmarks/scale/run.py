"""Peak memory and seconds per round as the number of clients grows (issue 18), one `fedcustom run` process per
setting so that each peak RSS is its own.

    python benchmarks/scale/run.py                       # the default grid (a few minutes per setting on 2 CPUs)
    python benchmarks/scale/run.py --methods full --clients 1 100
    python benchmarks/scale/run.py --methods full --codec gradualdiff   # a stateful (delta) chain both ways

Writes results.json and results.md beside this script (settings already in results.json are not run again).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = 400  # training rows, split over the clients (so 100 clients hold 4 rows each); 1,000 clients get 2 rows each
HISTORY = """
Before streaming FedAvg (issue 18's measurement of the same workload, full fine-tuning): peak RSS 1.6 GB with 1
client and 19.2 GB with 100 (11.7x), about 180 MB more per client: each reply's payload and its decoded state
(91 MB each) were held until the merge. The server now merges each update as it arrives and drops it.

Round time with many small clients of full fine-tuning is per-client work on a 91 MB state (decode the global,
load it into the model, an AdamW step, encode, decode, validate, merge), not training: a profile of 50 clients of
8 rows each (one step each) spent 30 s on a round, of which forward and backward took 6 s, the AdamW steps 6 s,
encoding and decoding the raw payloads 8 s (the byte count the run reports), merging 4 s and validating 3 s. An
in-place merge and a sum-first finiteness check took about 5 s off; torch's fused AdamW would take 4 s more off but
is not used (it flips a fragile baseline, see fedcustom.training.make_optimizer).
The overhead ratio against a bare PyTorch+PEFT loop is measured by overhead.py (overhead.md beside this file).

Stateful codec chain (`gradualdiff` = delta,zstd both ways; `python benchmarks/scale/run.py --methods full --codec
gradualdiff`): each link end used to keep its own full reference (server down, server up, client down, client up:
4 x 91 MB per client, about 36 GB for 100 clients of full fine-tuning; never measured, it would not fit this 23 GB
machine). Now links whose ends rebuilt the same state share one copy (compared bit for bit, so lossy chains share
only what is identical), the server encodes a down payload once per distinct reference, and upload links keep no
reference after their round: 100 clients take 1.18x the memory of 1 (the issue's target: <= 1.5x). A round of 100
clients takes about 3x the raw codec's time; where it goes (XOR and zstd of 91 MB per client each way) is not
profiled yet.
"""


def rows_for(clients: int) -> int:
    return max(ROWS, 2 * clients)


def run_setting(method: str, clients: int, rounds: int, data_dir: Path, codec: str = "raw") -> dict:
    """One embedded run on SST-2 (MiniLM, ``codec`` both ways, every client sampled every round)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "fedcustom.cli", "run", "--model", "minilm", "--method", method,
                   "--dataset", str(data_dir / "sst2/train.tsv"), "--eval-dataset", str(data_dir / "sst2/validation.tsv"),
                   "--max-train-examples", str(rows_for(clients)), "--max-eval-examples", "200", "--max-length", "48",
                   "--clients", str(clients), "--rounds", str(rounds), "--local-epochs", "1", "--batch-size", "8",
                   "--partition", "iid", "--codec", codec, "--codec-down", codec, "--no-count-flops", "--no-save-model",
                   "--no-checkpoint", "--quiet",
                   "--output", out]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        summary = json.loads((Path(out) / "summary.json").read_text())
    return {"method": method, "codec": codec, "clients": clients, "rounds": rounds, "train_rows": rows_for(clients), "peak_rss_mb": round(summary["peak_rss_mb"]),
            "seconds_per_round": round(sum(summary["round_wall_seconds"]) / rounds, 2),
            "process_seconds": round(time.perf_counter() - start, 1), "final_accuracy": summary["final_accuracy"]}


def codec_of(row: dict) -> str:
    return row.get("codec", "raw")  # rows measured before the --codec option used raw payloads


def write_report(rows: list[dict]) -> None:
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Memory and round time as clients grow", "",
             f"Machine: {platform.machine()}, {platform.processor() or 'CPU'}, 2 cores, no GPU; embedded runtime, "
             f"MiniLM, SST-2 ({ROWS} training rows split IID over the clients, 2 per client beyond 200 clients; all "
             f"sampled every round), the codec named in each row both ways, batch 8, 1 local epoch, 2 rounds.",
             "Command: `python benchmarks/scale/run.py` (raw rows) and `python benchmarks/scale/run.py --methods full "
             "--codec gradualdiff` (one process per row; peak RSS is that process's). Measured on 2026-11-29 while a "
             "niced benchmark used the idle CPU: timings are upper bounds.", "",
             "| method | codec | clients | rows | peak RSS (MB) | ratio to 1 client | s / round | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["method"], codec_of(r)): r["peak_rss_mb"] for r in rows if r["clients"] == 1}
    for r in sorted(rows, key=lambda r: (r["method"], codec_of(r) != "raw", codec_of(r), r["clients"])):
        key = (r["method"], codec_of(r))
        ratio = f"{r['peak_rss_mb'] / base[key]:.2f}" if key in base else "-"
        lines.append(f"| {r['method']} | {codec_of(r)} | {r['clients']} | {r.get('train_rows', ROWS)} | "
                     f"{r['peak_rss_mb']} | {ratio} | "
                     f"{r['seconds_per_round']} | "
                     f"{r['final_accuracy']:.3f} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n" + HISTORY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["full", "lora", "prefix"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--codec", default="raw", help="codec chain both ways, e.g. gradualdiff (default: raw)")
    parser.add_argument("--data-dir", type=Path, default=HERE.parents[2] / "shared" / "data")
    args = parser.parse_args()
    path = HERE / "results.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["method"], codec_of(r), r["clients"], r["rounds"]) for r in rows}
    for method in args.methods:
        for clients in args.clients:
            if (method, args.codec, clients, args.rounds) in done:
                continue
            rows.append(run_setting(method, clients, args.rounds, args.data_dir, args.codec))
            print(rows[-1], flush=True)
            write_report(rows)
    write_report(rows)


if __name__ == "__main__":
    main()
