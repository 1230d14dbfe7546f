"""One workload on four runtimes, side by side: embedded, Flower simulation (Ray), a real local SuperLink with one
SuperNode per client whose SuperExec starts a ClientApp process per message (Flower's default), and the same with
a persistent `fedcustom worker` per node (`fedcustom supernode --isolation process --wake-socket`). Reports wall
seconds per round (from each run's own round log), the SuperLink round minus the embedded round (a sharing round
sends one message to every node at once, so with 2 nodes this is about what one message costs on top of its work;
with 10 nodes on 2 cores it is mostly the nodes competing for the cores), and the peak resident memory of all
processes of the run together (sampled every 0.2 s with psutil).

Workloads: ``prefix`` (MiniLM prefix tuning, one message per node per round) and ``split`` (split learning, one
exchange per batch: s/batch is a steady round's seconds over its batches). ``--ping N`` also times N no-op
round trips to each node (``fedcustom ping``) on both SuperLink runtimes: a message's cost apart from its work.

Writes results.json and results.md beside this script; rows not re-run are kept, and the numbers measured before
the worker and before the wake socket are kept there too.

    .venv/bin/python benchmarks/runtimes/run.py [--clients 2 10] [--rounds 3] [--runtimes embedded superlink-worker]
        [--workloads prefix split] [--ping 20]
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


ROWS, BATCH = 30, 8  # each client's rows and batch size: ceil(30 / 8) = 4 batches per client per round
WORKLOADS = {
    "prefix": ["--method", "prefix", "--num-virtual-tokens", "20", "--max-eval-examples", "200"],
    # the client runs the embeddings and 3 layers, the server the other 3 and the head; a small eval set, so that
    # a round is mostly its batches
    "split": ["--method", "split", "--cut-layer", "3", "--max-eval-examples", "40"],
}


def workload(clients: int, rounds: int, out: Path, kind: str = "prefix") -> list[str]:
    """MiniLM on SST-2 rows, the same steps on every runtime (the main job's other settings)."""
    return ["--config", str(REPO / "configs" / "main.toml"), *WORKLOADS[kind],
            "--dataset", str(SST2 / "validation.tsv"), "--clients", str(clients), "--rounds", str(rounds),
            "--local-epochs", "1", "--batch-size", str(BATCH), "--max-train-examples", str(ROWS * clients),
            "--no-centralized", "--no-report", "--quiet", "--output", str(out)]


def rounds_of(out: Path) -> list[float]:
    return [json.loads(line)["wall_seconds"] for line in (out / "round_log.jsonl").read_text().splitlines()[1:]]


def megabytes_of(out: Path) -> list[float]:
    """MB sent both ways per round (all clients), from the round log."""
    rounds = [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()[1:]]
    return [(sum(r["bytes_up"].values()) + sum(r["bytes_down"].values())) / 1e6 for r in rounds]


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


def start_nodes(cluster: Cluster, clients: int, root: Path, worker: bool) -> None:
    """A SuperLink and one SuperNode per client, each with its own rows (and its worker)."""
    files = owner_files(clients, root)
    cluster.start_superlink()
    configs = {f"owner{i}": f"partition-id={i} data-path='{files[i]}'" for i in range(clients)}
    if worker:
        cluster.start_worker_nodes(configs)
    else:
        for name, config in configs.items():
            cluster.start_supernode(name, config)


def on_superlink(clients: int, rounds: int, root: Path, env: dict[str, str], worker: bool, kind: str) -> dict:
    """One run submitted to a local SuperLink with one SuperNode per client (each with its own rows)."""
    out = root / "out"
    with Cluster(root / "cluster") as cluster:
        start_nodes(cluster, clients, root, worker)
        daemons = [p.pid for p in cluster.processes.values()]
        start = time.perf_counter()
        process = subprocess.Popen([str(BIN / "fedcustom"), "submit", "--superlink", cluster.address, "--insecure",
                                    *workload(clients, rounds, out, kind)], env=env)
        with PeakMemory([process.pid, *daemons]) as memory:
            if process.wait() != 0:
                raise RuntimeError("fedcustom submit failed")
        return {"wall_seconds": time.perf_counter() - start, "round_seconds": rounds_of(out),
                "round_megabytes": megabytes_of(out), "peak_rss_bytes": memory.peak}


def measure(runtime: str, clients: int, rounds: int, root: Path, kind: str = "prefix") -> dict:
    env = flower_env(root / "flwr-home")
    if runtime in ("embedded", "flower-sim"):
        out = root / runtime
        wall, peak = run_cli(["run", *workload(clients, rounds, out, kind), "--runtime", runtime], env)
        row = {"wall_seconds": wall, "round_seconds": rounds_of(out), "round_megabytes": megabytes_of(out),
               "peak_rss_bytes": peak}
    else:
        row = on_superlink(clients, rounds, root, env, runtime == "superlink-worker", kind)
    steady = row["round_seconds"][1:] or row["round_seconds"]  # round 1 includes loading the model
    measured = {"runtime": LABELS.get(runtime, runtime), "key": runtime, "clients": clients, "workload": kind,
                "measured": datetime.date.today().isoformat(),
                "mean_s_per_round": sum(row["round_seconds"]) / len(row["round_seconds"]),
                "steady_s_per_round": sum(steady) / len(steady), **row}
    if kind == "split":
        measured["s_per_batch"] = measured["steady_s_per_round"] / (clients * -(-ROWS // BATCH))
    return measured


def ping(runtime: str, clients: int, messages: int, root: Path) -> dict:
    """``fedcustom ping``: ``messages`` no-op round trips to each node of a local SuperLink."""
    env = flower_env(root / "flwr-home")
    with Cluster(root / "cluster") as cluster:
        start_nodes(cluster, clients, root, runtime == "superlink-worker")
        subprocess.run([str(BIN / "fedcustom"), "ping", "--superlink", cluster.address, "--insecure", "--clients",
                        str(clients), "--messages", str(messages), "--output", str(root / "ping")], env=env, check=True)
    result = json.loads((root / "ping" / "ping.json").read_text())
    return {"runtime": LABELS[runtime], "key": runtime, "clients": clients,
            "measured": datetime.date.today().isoformat(), **result["summary"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--workloads", nargs="+", default=["prefix"], choices=list(WORKLOADS))
    parser.add_argument("--ping", type=int, default=0, metavar="N", help="also N no-op round trips per node")
    args = parser.parse_args()
    path = HERE / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: saved.get(k, []) for k in ("previous", "before_wake", "ping", "ping_before_pulls", "split_before_fused",
                                         "split_before_rows", "split_repeats", "split_before_pulls",
                                         "prefix_before_pulls")}
    results = [{**r, "workload": r.get("workload", "prefix")} for r in saved.get("results", []) if "key" in r]
    for clients in args.clients:
        for kind in args.workloads:
            for runtime in args.runtimes:
                with tempfile.TemporaryDirectory(prefix="fedcustom-runtimes-") as tmp:
                    row = measure(runtime, clients, args.rounds, Path(tmp), kind)
                results = [r for r in results if (r["key"], r["clients"], r["workload"]) != (runtime, clients, kind)]
                results.append(row)
                print(f"{kind}: {row['runtime']}, {clients} clients: {row['mean_s_per_round']:.2f} s / round", flush=True)
                write(results, kept, args.rounds)
        for runtime in [r for r in args.runtimes if r.startswith("superlink")] if args.ping else []:
            with tempfile.TemporaryDirectory(prefix="fedcustom-ping-") as tmp:
                row = ping(runtime, clients, args.ping, Path(tmp))
            kept["ping"] = [r for r in kept["ping"] if (r["key"], r["clients"]) != (runtime, clients)] + [row]
            print(f"ping: {row['runtime']}, {clients} clients: median {row['median_s']:.3f} s", flush=True)
            write(results, kept, args.rounds)


def _split_row(r: dict, embedded_s_per_batch: float | None) -> str:
    ratio = f"{r['s_per_batch'] / embedded_s_per_batch:.1f}" if embedded_s_per_batch else "-"
    megabytes = ", ".join(f"{m:.0f}" for m in r.get("round_megabytes", [])) or "-"
    return (f"| {r['runtime']} | {r['clients']} | {', '.join(f'{s:.1f}' for s in r['round_seconds'])} | {megabytes} | "
            f"{r['s_per_batch']:.2f} | {ratio} | {r.get('measured', 'earlier')} |")


def write(results: list[dict], kept: dict[str, list[dict]], rounds: int) -> None:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"
    command = ".venv/bin/python benchmarks/runtimes/run.py --clients 2 10 --workloads prefix split --ping 20"
    (HERE / "results.json").write_text(json.dumps({"command": command, "machine": machine, "results": results,
                                                   **kept}, indent=2) + "\n")
    prefix = [r for r in results if r["workload"] == "prefix"]
    embedded = {r["clients"]: r["steady_s_per_round"] for r in prefix if r["key"] == "embedded"}
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Workload: MiniLM prefix tuning (20 tokens), N clients x 30 SST-2 rows, 1 local epoch, batch 8, the "
             f"rounds listed (--rounds, {rounds} in the last run), 200 eval rows; every node on this machine (torch: 1 "
             f"thread per worker). Rows of 2026-12-05 were measured with the background converge bench paused (SIGSTOP), nothing else running.", "",
             "| runtime | clients | mean s / round | rounds (s) | steady s / round (rounds 2+) | x embedded | "
             "minus embedded (s / round) | peak RSS, all processes | measured |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in sorted(prefix, key=lambda r: (r["clients"], RUNTIMES.index(r["key"]))):
        base = embedded.get(r["clients"])
        ratio = f"{r['steady_s_per_round'] / base:.1f}" if base else "-"
        overhead = f"{r['steady_s_per_round'] - base:.2f}" if base and r["key"].startswith("superlink") else "-"
        lines.append(f"| {r['runtime']} | {r['clients']} | {r['mean_s_per_round']:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['round_seconds'])} | {r['steady_s_per_round']:.1f} | {ratio} | "
                     f"{overhead} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r.get('measured', 'earlier')} |")
    if kept["prefix_before_pulls"]:
        lines += ["", "The same prefix workload before the shorter object pulls (`deploy/flower/pulls.py`):", "",
                  "| runtime | clients | rounds (s) | steady s / round | x embedded then | measured |",
                  "|---|---:|---|---:|---:|---|"]
        then = {r["clients"]: r["steady_s_per_round"] for r in kept["prefix_before_pulls"] if r["key"] == "embedded"}
        lines += [f"| {r['runtime']} | {r['clients']} | {', '.join(f'{s:.1f}' for s in r['round_seconds'])} | "
                  f"{r['steady_s_per_round']:.1f} | {r['steady_s_per_round'] / then[r['clients']]:.2f} | "
                  f"{r.get('measured', 'earlier')} |"
                  for r in sorted(kept["prefix_before_pulls"], key=lambda r: (r["clients"], RUNTIMES.index(r["key"])))]
    split = [r for r in results if r["workload"] == "split"]
    if split:
        base = {r["clients"]: r["s_per_batch"] for r in split if r["key"] == "embedded"}
        lines += ["", "Split learning (`--method split --cut-layer 3`, 4 batches per client per round, 40 eval rows; "
                  "one exchange per batch: its backward and the next batch's forward or, after the last, the trained "
                  "client half; plus begin per client; weights as changed rows): s / batch is a steady round over its "
                  "batches.", "",
                  "| runtime | clients | rounds (s) | MB per round | s / batch | x embedded | measured |",
                  "|---|---:|---|---|---:|---:|---|"]
        lines += [_split_row(r, base.get(r["clients"])) for r in sorted(split, key=lambda r: (r["clients"],
                                                                                               RUNTIMES.index(r["key"])))]
    if kept["split_repeats"]:
        lines += ["", "The same split workload and code, a pair measured about 25 minutes earlier (rounds vary by up to 40% "
                  "on this machine):", "", "| runtime | clients | rounds (s) | MB per round | s / batch | x embedded | "
                  "measured |", "|---|---:|---|---|---:|---:|---|"]
        earlier = {r["clients"]: r["s_per_batch"] for r in kept["split_repeats"] if r["key"] == "embedded"}
        lines += [_split_row(r, earlier.get(r["clients"])) for r in kept["split_repeats"]]
    if kept["split_before_pulls"]:
        lines += ["", "Split learning before the shorter object pulls (Flower's 1 s first retry for a message object not "
                  "pushed yet, `deploy/flower/pulls.py`), two pairs measured minutes apart in the session before:", "",
                  "| runtime | clients | rounds (s) | MB per round | s / batch | x embedded | measured |",
                  "|---|---:|---|---|---:|---:|---|"]
        for note in dict.fromkeys(r.get("note") for r in kept["split_before_pulls"]):
            pair = [r for r in kept["split_before_pulls"] if r.get("note") == note]
            before = {r["clients"]: r["s_per_batch"] for r in pair if r["key"] == "embedded"}
            lines += [_split_row(r, before.get(r["clients"])) for r in pair]
    if kept["split_before_rows"]:
        lines += ["", "Split learning before the weights travelled as changed rows and the trained half rode on the last "
                  "reply (commit 504353e: the whole 68 MB client half down at begin and up at a split_end message), "
                  "measured in the same session as the pairs before the shorter pulls:", "",
                  "| runtime | clients | rounds (s) | MB per round | s / batch | x embedded | measured |",
                  "|---|---:|---|---|---:|---:|---|"]
        before = {r["clients"]: r["s_per_batch"] for r in kept["split_before_rows"] if r["key"] == "embedded"}
        lines += [_split_row(r, before.get(r["clients"])) for r in kept["split_before_rows"]]
    if kept["split_before_fused"]:
        lines += ["", "Split learning before a batch's backward and the next forward shared one exchange (two "
                  "exchanges per batch: an empty forward request, then the backward), as measured then:", "",
                  "| runtime | clients | rounds (s) | s / batch | x embedded then | measured |",
                  "|---|---:|---|---:|---:|---|"]
        lines += [f"| {r['runtime']} | {r['clients']} | {', '.join(f'{s:.1f}' for s in r['round_seconds'])} | "
                  f"{r['s_per_batch']:.2f} | {r['x_embedded']:.1f} | {r['measured']} |" for r in kept["split_before_fused"]]
    if kept["ping"]:
        lines += ["", "Per-message overhead (`fedcustom ping`: a no-op query to every node, round trips after the "
                  "first):", "", "| runtime | clients | median s | mean s | p90 s | max s | first round s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['runtime']} | {r['clients']} | {r['median_s']:.3f} | {r['mean_s']:.3f} | {r['p90_s']:.3f} | "
                  f"{r['max_s']:.3f} | {r['first_round_s']:.3f} |" for r in kept["ping"]]
    if kept["ping_before_pulls"]:
        lines += ["", "The same before the shorter object pulls:", "",
                  "| runtime | clients | median s | mean s | p90 s | max s | first round s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['runtime']} | {r['clients']} | {r['median_s']:.3f} | {r['mean_s']:.3f} | {r['p90_s']:.3f} | "
                  f"{r['max_s']:.3f} | {r['first_round_s']:.3f} |" for r in kept["ping_before_pulls"]]
    if kept["before_wake"]:
        lines += ["", "The worker before the wake socket (it polled its node for tasks, backing off to 0.5 s; the node "
                  "polled for the worker's reply every 0.05 s), as measured then:", "",
                  "| runtime | clients | steady s / round | x embedded then |", "|---|---:|---:|---:|"]
        lines += [f"| {r['runtime']} | {r['clients']} | {r['steady_s_per_round']:.1f} | {r['x_embedded']:.1f} |"
                  for r in kept["before_wake"]]
    lines += ["", "Before the worker (issue 20's starting point; prefix tuning through the main job of that time, "
              "10 clients, 3 rounds):", "", "| runtime | mean s / round | rounds (s) |", "|---|---:|---|"]
    lines += [f"| {r['runtime']} | {r['mean_s_per_round']:.1f} | {', '.join(f'{s:.1f}' for s in r['round_seconds'])} |"
              for r in kept["previous"]]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
