"""Peak memory of flower-sim's client actor as the number of clients grows: one shared client handler per
simulation (since 3e79e00) against one handler per simulated node (before it).

    python benchmarks/scale/flower_sim.py                      # this checkout, 2 and 8 clients
    python benchmarks/scale/flower_sim.py --src /tmp/old/src --label "b6b86a2 (a handler per node)"

Each setting is one `fedcustom run --runtime flower-sim` (packaged MiniLM, LoRA, SST-2, 1 round, 160 training rows
split over the clients); a sampler reads the resident memory of every process the run starts (Ray's workers
included) every 0.2 s and keeps each process's peak. The client actor is the Ray worker with the largest peak. Rows
are appended to flower_sim.json beside this script (a setting measured again replaces its row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[2] / "shared" / "data"
RESULTS = HERE / "flower_sim.json"


def measure(clients: int, src: str | None) -> dict:
    out = tempfile.mkdtemp(prefix=f"fedcustom-simmem-{clients}-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = src
    cmd = [sys.executable, "-m", "fedcustom.cli", "run", "--runtime", "flower-sim", "--model", "minilm",
           "--method", "lora", "--dataset", str(DATA / "sst2/train.tsv"), "--clients", str(clients), "--rounds", "1",
           "--local-epochs", "1", "--max-length", "32", "--output", out, "--quiet", "--no-count-flops",
           "--max-train-examples", "160", "--max-eval-examples", "32", "--no-save-model", "--no-report"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, tuple[str, int]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss, name = p.memory_info().rss, " ".join(p.cmdline())[:60]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rss > peaks.get(p.pid, ("", 0))[1]:
                    peaks[p.pid] = (name, rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"run with {clients} clients failed:\n{err[-2000:]}")
    workers = [rss for name, rss in peaks.values() if name.startswith("ray::")]
    summary = json.loads((Path(out) / "summary.json").read_text())
    return {"clients": clients, "actor_peak_rss_mb": round(max(workers) / 2**20, 1),
            "driver_peak_rss_mb": round(peaks[proc.pid][1] / 2**20, 1), "seconds": round(time.perf_counter() - start, 1),
            "final_accuracy": summary["final_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--src", help="the src/ folder of another checkout to measure (PYTHONPATH)")
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    for clients in args.clients:
        row = {"code": args.label, **measure(clients, args.src)}
        print(row, flush=True)
        rows = [r for r in rows if (r["code"], r["clients"]) != (args.label, clients)] + [row]
    RESULTS.write_text(json.dumps({
        "command": "python benchmarks/scale/flower_sim.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (two converge bench runs beside it)",
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
