"""One workload on three runtimes, side by side: embedded, Flower simulation (Ray), and a real local
SuperLink with one SuperNode per client (processes on 127.0.0.1, insecure). Reports wall seconds per
round (from each run's own round log) and the peak resident memory of all processes of the run
together (sampled every 0.2 s with psutil: the run's own process tree, plus for Flower the SuperLink
and SuperNode trees and the processes they spawn). Writes results.json and results.md beside this
script.

    .venv/bin/python benchmarks/runtimes/run.py [--clients 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
from flower_cluster import BIN, Cluster, flower_env  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2"


class PeakMemory:
    """Peak of the summed RSS of ``roots`` and all their descendants (plus processes added later)."""

    def __init__(self, roots: list[int]) -> None:
        self.roots, self.peak, self._stop = list(roots), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            total, seen = 0, set()
            for pid in list(self.roots):
                try:
                    root = psutil.Process(pid)
                    for proc in [root, *root.children(recursive=True)]:
                        if proc.pid not in seen:
                            seen.add(proc.pid)
                            total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def workload(clients: int, rounds: int, out: Path) -> list[str]:
    """MiniLM prefix tuning on SST-2 rows, the same steps on every runtime."""
    return ["--config", str(REPO / "configs" / "main.toml"), "--dataset", str(SST2 / "validation.tsv"),
            "--clients", str(clients), "--rounds", str(rounds), "--local-epochs", "1", "--max-train-examples",
            str(30 * clients), "--max-eval-examples", "200", "--no-centralized", "--quiet", "--output", str(out)]


def rounds_of(out: Path) -> list[float]:
    return [json.loads(line)["wall_seconds"] for line in (out / "round_log.jsonl").read_text().splitlines()[1:]]


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak memory of one `fedcustom` command and its children."""
    start = time.perf_counter()
    process = subprocess.Popen([str(BIN / "fedcustom"), *args], env=env)
    with PeakMemory([process.pid]) as memory:
        if process.wait() != 0:
            raise RuntimeError(f"fedcustom {' '.join(args)} failed")
    return time.perf_counter() - start, memory.peak


def owner_files(clients: int, root: Path) -> list[Path]:
    """Each SuperNode's own rows: client i gets rows i, i+N, ... of the SST-2 training file (30 each)."""
    rows = pd.read_csv(SST2 / "train.tsv", sep="\t")
    paths = []
    for i in range(clients):
        path = root / f"owner{i}.csv"
        rows.iloc[i :: clients].iloc[:30].to_csv(path, index=False)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedcustom-runtimes-") as tmp:
        root = Path(tmp)
        env = flower_env(root / "flwr-home")
        for runtime in ("embedded", "flower-sim"):
            out = root / runtime
            wall, peak = run_cli(["run", *workload(args.clients, args.rounds, out), "--runtime", runtime], env)
            results.append({"runtime": runtime, "wall_seconds": wall, "round_seconds": rounds_of(out),
                            "peak_rss_bytes": peak})
        out = root / "superlink"
        files = owner_files(args.clients, root)
        with Cluster(root / "cluster") as cluster:
            cluster.start_superlink()
            for i in range(args.clients):
                cluster.start_supernode(f"owner{i}", f"partition-id={i} data-path='{files[i]}'")
            daemons = [p.pid for p in cluster.processes.values()]
            start = time.perf_counter()
            process = subprocess.Popen([str(BIN / "fedcustom"), "submit", "--superlink", cluster.address, "--insecure",
                                        *workload(args.clients, args.rounds, out)], env=env)
            with PeakMemory([process.pid, *daemons]) as memory:
                if process.wait() != 0:
                    raise RuntimeError("fedcustom submit failed")
            results.append({"runtime": "flower (SuperLink + SuperNodes)", "wall_seconds": time.perf_counter() - start,
                            "round_seconds": rounds_of(out), "peak_rss_bytes": memory.peak})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    command = f".venv/bin/python benchmarks/runtimes/run.py --clients {args.clients} --rounds {args.rounds}"
    (HERE / "results.json").write_text(json.dumps({"command": command, "machine": machine, "results": results},
                                                  indent=2) + "\n")
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Workload: MiniLM prefix tuning (20 tokens), {args.clients} clients x 30 SST-2 rows, 1 local epoch, "
             f"batch 8, {args.rounds} rounds, 200 eval rows.", "",
             "| runtime | mean s / round | rounds (s) | whole command (s) | peak RSS, all processes |",
             "|---|---:|---|---:|---:|"]
    for r in results:
        mean = sum(r["round_seconds"]) / len(r["round_seconds"])
        lines.append(f"| {r['runtime']} | {mean:.1f} | {', '.join(f'{s:.1f}' for s in r['round_seconds'])} | "
                     f"{r['wall_seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
