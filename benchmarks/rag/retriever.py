"""Federated retriever customization on the packaged ChatterBot corpus (issue 22, item 5).

The packaged MiniLM encoder trained on (question, answer) pairs with the in-batch contrastive loss by full
fine-tuning, LoRA, prompt and prefix tuning: 4 clients, Dirichlet(1.0) topic skew, 3 rounds, each method at its
recommended rate (fedcustom.methods.defaults.RETRIEVAL). No centralized baseline: on 2 CPUs it would double the
time (full fine-tuning: about 7 minutes per round), so only before/after is measured.
recall@5 and MRR of each held-out question's answer among all held-out answers, before (round 0, the pretrained
encoder) and after. Finished runs are reused. Writes benchmarks/results/rag/retriever.md and retriever.json.

    .venv/bin/python benchmarks/rag/retriever.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedcustom.bench.report import machine as bench_machine, machine_line

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "rag"
RUNS = ROOT / "runs" / "bench-retriever"
METHODS = ("lora", "prompt", "prefix", "full")  # full last: the slowest
COMMON = ["--task", "retrieval", "--model", "minilm", "--dataset", "chatterbot", "--clients", "4", "--rounds", "3",
          "--partition", "dirichlet:1.0", "--quiet", "--no-report"]


def run(method: str) -> dict:
    out = RUNS / method
    if not (out / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "fedcustom.cli", "run", *COMMON, "--method", method,
                        "--output", str(out)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"method": method, "before": {"recall_at_5": log[0]["eval_recall_at_5"], "mrr": log[0]["eval_mrr"]},
            "after": {"recall_at_5": log[-1]["eval_recall_at_5"], "mrr": log[-1]["eval_mrr"]},
            "bytes_up_per_round": summary.get("bytes_up_per_round"),
            "seconds": sum(r["wall_seconds"] for r in log)}


def main() -> None:
    done = [m for m in (sys.argv[1:] or METHODS)]
    rows = [run(m) for m in done]
    OUT.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, "benchmarks/rag/retriever.py", *sys.argv[1:]])
    machine = machine_line(bench_machine())
    (OUT / "retriever.json").write_text(json.dumps({"command": command, "machine": machine, "runs": rows}, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["# Federated retriever customization: MiniLM on ChatterBot pairs", "",
             f"`{command}` on {machine}. 4 clients, Dirichlet(1.0) over topics, 3 rounds, 1 local epoch at each "
             f"method's recommended rate; recall@5 and MRR of each held-out question's answer among all held-out "
             f"answers. Before = the pretrained encoder (round 0).", "",
             "| method | recall@5 before | recall@5 after | MRR before | MRR after | MB up per client per round | "
             "wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = (r["bytes_up_per_round"] or 0) / 1e6
        lines.append(f"| {r['method']} | {fmt(r['before']['recall_at_5'])} | {fmt(r['after']['recall_at_5'])} | "
                     f"{fmt(r['before']['mrr'])} | {fmt(r['after']['mrr'])} | {mb:.3f} | {r['seconds']:.0f} |")
    (OUT / "retriever.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
