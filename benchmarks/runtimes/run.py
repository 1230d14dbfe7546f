"""One workload on four runtimes, side by side: embedded, Flower simulation (Ray), a real local SuperLink with one
SuperNode per client whose SuperExec starts a ClientApp process per message (Flower's default), and the same with
a persistent `fedcustom worker` per node (`fedcustom supernode --isolation process`). Reports wall seconds per
round (from each run's own round log), the SuperLink round minus the embedded round (a sharing round sends one
message to every node at once, so with 2 nodes this is about what one message costs on top of its work; with 10
nodes on 2 cores it is mostly the nodes competing for the cores), and the peak resident memory of all processes of the run together (sampled every 0.2 s with psutil). Writes results.json
and results.md beside this script; the numbers measured before the worker are kept there under "previous".

    .venv/bin/python benchmarks/runtimes/run.py [--clients 2 10] [--rounds 3] [--runtimes embedded superlink-worker]
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
sys.path.insert(0, str(REPO / "tests" / "deploy"))
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
    """MiniLM prefix tuning on SST-2 rows, the same steps on every runtime (the main job's other settings)."""
    return ["--config", str(REPO / "configs" / "main.toml"), "--method", "prefix", "--num-virtual-tokens", "20",
            "--dataset", str(SST2 / "validation.tsv"), "--clients", str(clients), "--rounds", str(rounds),
            "--local-epochs", "1", "--batch-size", "8", "--max-train-examples", str(30 * clients),
            "--max-eval-examples", "200", "--no-centralized", "--no-report", "--quiet", "--output", str(out)]


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


RUNTIMES = ("embedded", "flower-sim", "superlink", "superlink-worker")
LABELS = {"superlink": "flower (SuperLink + SuperNodes, a process per message)",
          "superlink-worker": "flower (SuperLink + SuperNodes + fedcustom worker)"}


def on_superlink(clients: int, rounds: int, root: Path, env: dict[str, str], worker: bool) -> dict:
    """One run submitted to a local SuperLink with one SuperNode per client (each with its own rows)."""
    out, files = root / "out", owner_files(clients, root)
    with Cluster(root / "cluster") as cluster:
        cluster.start_superlink()
        for i in range(clients):
            config = f"partition-id={i} data-path='{files[i]}'"
            if worker:
                cluster.start_worker_node(f"owner{i}", config)
            else:
                cluster.start_supernode(f"owner{i}", config)
        daemons = [p.pid for p in cluster.processes.values()]
        start = time.perf_counter()
        process = subprocess.Popen([str(BIN / "fedcustom"), "submit", "--superlink", cluster.address, "--insecure",
                                    *workload(clients, rounds, out)], env=env)
        with PeakMemory([process.pid, *daemons]) as memory:
            if process.wait() != 0:
                raise RuntimeError("fedcustom submit failed")
        return {"wall_seconds": time.perf_counter() - start, "round_seconds": rounds_of(out),
                "peak_rss_bytes": memory.peak}


def measure(runtime: str, clients: int, rounds: int, root: Path) -> dict:
    env = flower_env(root / "flwr-home")
    if runtime in ("embedded", "flower-sim"):
        out = root / runtime
        wall, peak = run_cli(["run", *workload(clients, rounds, out), "--runtime", runtime], env)
        row = {"wall_seconds": wall, "round_seconds": rounds_of(out), "peak_rss_bytes": peak}
    else:
        row = on_superlink(clients, rounds, root, env, worker=runtime == "superlink-worker")
    steady = row["round_seconds"][1:] or row["round_seconds"]  # round 1 includes loading the model
    return {"runtime": LABELS.get(runtime, runtime), "key": runtime, "clients": clients,
            "mean_s_per_round": sum(row["round_seconds"]) / len(row["round_seconds"]),
            "steady_s_per_round": sum(steady) / len(steady), **row}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    args = parser.parse_args()
    path = HERE / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    previous = saved.get("previous") or [{**r, "clients": 10, "mean_s_per_round": sum(r["round_seconds"]) /
                                          len(r["round_seconds"])} for r in saved.get("results", [])
                                         if "key" not in r]
    results = [r for r in saved.get("results", []) if "key" in r]
    for clients in args.clients:
        for runtime in args.runtimes:
            with tempfile.TemporaryDirectory(prefix="fedcustom-runtimes-") as tmp:
                row = measure(runtime, clients, args.rounds, Path(tmp))
            results = [r for r in results if (r["key"], r["clients"]) != (runtime, clients)] + [row]
            print(f"{row['runtime']}, {clients} clients: {row['mean_s_per_round']:.2f} s / round", flush=True)
            write(results, previous, args.rounds)


def write(results: list[dict], previous: list[dict], rounds: int) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    command = ".venv/bin/python benchmarks/runtimes/run.py --clients 2 10"
    (HERE / "results.json").write_text(json.dumps({"command": command, "machine": machine, "results": results,
                                                   "previous": previous}, indent=2) + "\n")
    embedded = {r["clients"]: r["steady_s_per_round"] for r in results if r["key"] == "embedded"}
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Workload: MiniLM prefix tuning (20 tokens), N clients x 30 SST-2 rows, 1 local epoch, batch 8, {rounds} "
             f"rounds, 200 eval rows; every node on this machine (torch: 1 thread per worker).", "",
             "| runtime | clients | mean s / round | rounds (s) | steady s / round (rounds 2+) | x embedded | "
             "minus embedded (s / round) | peak RSS, all processes |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["clients"], RUNTIMES.index(r["key"]))):
        base = embedded.get(r["clients"])
        ratio = f"{r['steady_s_per_round'] / base:.1f}" if base else "-"
        overhead = f"{r['steady_s_per_round'] - base:.2f}" if base and r["key"].startswith("superlink") else "-"
        lines.append(f"| {r['runtime']} | {r['clients']} | {r['mean_s_per_round']:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['round_seconds'])} | {r['steady_s_per_round']:.1f} | {ratio} | "
                     f"{overhead} | {r['peak_rss_bytes'] / 2**30:.2f} GiB |")
    lines += ["", "Before the worker (issue 20's starting point; prefix tuning through the main job of that time, "
              "10 clients, 3 rounds):", "", "| runtime | mean s / round | rounds (s) |", "|---|---:|---|"]
    lines += [f"| {r['runtime']} | {r['mean_s_per_round']:.1f} | {', '.join(f'{s:.1f}' for s in r['round_seconds'])} |"
              for r in previous]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
