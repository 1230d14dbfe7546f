"""`fedcustom bench --preset generative`: federated instruction tuning of a causal LM, six methods.

Full fine-tuning, LoRA (Hu et al. ICLR 2022), prompt tuning (Lester et al. EMNLP 2021), prefix
tuning (Li & Liang ACL 2021), U-shaped split learning (Split-FedLLM, arXiv 2501.04436; SmolLM2 ties
its LM head to its embeddings, so the head stays on the client) and token-level KD-FedLLM (top-k
next-token distributions on a public set carved from the training rows) of the packaged
SmolLM2-135M-Instruct (Allal et al. 2025) on the packaged ChatterBot Q/A corpus, each with its
centralized baseline (same model, method, optimizer
and example passes on the union of the clients' rows). Per method: held-out response perplexity,
ROUGE-L (Lin 2004) and exact match of greedy generations, before and after federated training and
for the centralized baseline, with the bytes and client FLOPs one round costs. FedAvg over the
method's trainable tensors, as in FedPETuning (Zhang et al. ACL 2023 Findings).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
from rich.console import Console

from fedcustom.bench.report import MB, machine_line
from fedcustom.bench.reuse import pinned, run_or_reuse
from fedcustom.config import RunConfig

METRICS = ("perplexity", "rouge_l", "exact_match")
KEYS = (*(f"{stage}_{m}" for m in METRICS for stage in ("initial", "final", "centralized")),
        *(f"{m}_per_round" for m in METRICS), "bytes_up_per_round", "bytes_down_per_round", "client_flops_per_round",
        "trainable_params", "total_params", "train_examples", "eval_examples", "round_wall_seconds", "wall_seconds")
PLOT = "perplexity_vs_round.png"
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "prompt": "prompt tuning", "prefix": "prefix tuning",
                "split": "U-shaped split learning", "distill": "token-level KD-FedLLM"}


@dataclass(frozen=True)
class GenerativeSetting:
    """Model, data, schedule and generation budget shared by every run; sized so the whole preset (4 methods, each
    with its centralized baseline) takes about half an hour on 2 busy CPU cores. Learning rates are common
    choices for a ~135M LM per method, not tuned."""

    model: str = "smollm2"  # packaged alias, local folder or Hub name
    dataset: str = "chatterbot"  # packaged alias or local instruction file (JSONL/CSV/Parquet)
    chat_template: bool = True  # False for tokenizers without one (the tests' tiny LLaMA)
    partition: str = "iid"
    # Sizing, measured on this machine while another benchmark and a test suite ran (load 6-9 on 2 cores):
    # LoRA with 3 clients x 2 steps of batch 8, 32 eval rows and 16 generations of 32 tokens took ~150 s for
    # the initial evaluation and 311 s for one round, i.e. ~20 min per method with 2 rounds and its
    # baseline. Halving the batch and the generations (and shortening them) brings it to ~8 min per method.
    max_train: int = 120
    max_eval: int = 24
    max_length: int = 256  # prompt + response tokens: chatterbot's longest row is 345, its longest prompt 127
    clients: int = 3  # all sampled every round
    rounds: int = 2
    local_steps: int = 2
    batch_size: int = 4
    max_new_tokens: int = 24
    eval_generations: int = 8
    num_virtual_tokens: int = 20
    lora_r: int = 8
    seed: int = 0
    # the upper ends of the usual ranges for a ~135M LM, since each client takes only 4 steps in all; not tuned
    methods: tuple[tuple[str, float], ...] = (("full", 5e-5), ("lora", 1e-3), ("prompt", 3e-2), ("prefix", 1e-2),
                                              ("split", 5e-5), ("distill", 1e-3))
    cut_layer: int = 4  # split: the clients run the embeddings, layers [0, 4) and (tied to the embeddings) the LM head
    public_size: int = 24  # distill: public [prompt, response] pairs, carved out of the training rows
    topk: int = 8  # distill: next-token probabilities sent per public response token


def method_options(s: GenerativeSetting, method: str) -> dict[str, Any]:
    """The [method] settings one method needs beyond the shared ones."""
    if method == "split":
        return {"cut_layer": s.cut_layer, "split_head": "client"}
    if method == "distill":
        return {"public_size": s.public_size, "topk": s.topk, "local_method": "lora"}
    return {}


def run_config(s: GenerativeSetting, method: str, lr: float, out: Path) -> RunConfig:
    return pinned({
        "model": {"name": s.model, "task": "causal-lm", "max_length": s.max_length},
        "data": {"dataset": s.dataset, "partition": s.partition, "max_train_examples": s.max_train,
                 "max_eval_examples": s.max_eval},
        "method": {"name": method, "num_virtual_tokens": s.num_virtual_tokens, "lora_r": s.lora_r,
                   **method_options(s, method)},
        "federation": {"clients": s.clients, "rounds": s.rounds, "local_steps": s.local_steps},
        "generation": {"chat_template": s.chat_template, "max_new_tokens": s.max_new_tokens,
                       "eval_generations": s.eval_generations},
        "train": {"batch_size": s.batch_size, "lr": lr, "seed": s.seed, "centralized": True},
        "output": {"dir": str(out / "runs" / method), "quiet": True, "save_model": False, "checkpoint": False},
    })


def final_samples(folder: Path) -> list[dict[str, str]]:
    """The sample generations of the last round in the run's round log (none if it has no log)."""
    log = folder / "round_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return json.loads(lines[-1]).get("eval_samples", []) if lines else []


def run_generative(out: Path, console: Console,
                   setting: GenerativeSetting = GenerativeSetting()) -> list[dict[str, Any]]:
    """One federated run per method, each with its centralized baseline, reusing finished runs with the same config."""
    records = []
    for i, (method, lr) in enumerate(setting.methods, 1):
        cfg = run_config(setting, method, lr, out)
        folder, start = Path(cfg.output.dir), time.perf_counter()
        summary, reused = run_or_reuse(cfg)
        central = summary.get("centralized") or {}
        records.append({"method": method, "lr": lr, "reused": reused, **{k: summary.get(k) for k in KEYS},
                        "centralized_wall_seconds": central.get("wall_seconds"),
                        "centralized_flops": central.get("flops"), "samples": final_samples(folder)})
        console.print(f"[{i}/{len(setting.methods)}] {method} lr {lr:g}: perplexity {summary['initial_perplexity']:.2f}"
                      f" -> {summary['final_perplexity']:.2f} (centralized {summary['centralized_perplexity']:.2f}), "
                      f"ROUGE-L {summary['final_rouge_l']:.3f} ({time.perf_counter() - start:.0f} s)")
    return records


def rows(records: list[dict]) -> list[dict[str, Any]]:
    """One row per method: the measured metrics, federated minus centralized gaps, MB and GFLOPs per client and
    round."""
    return [{
        "method": r["method"], "lr": r["lr"], "trainable_params": r["trainable_params"],
        **{f"{stage}_{m}": r[f"{stage}_{m}"] for m in METRICS for stage in ("initial", "final", "centralized")},
        "perplexity_gap": r["final_perplexity"] - r["centralized_perplexity"],
        "rouge_l_gap": r["final_rouge_l"] - r["centralized_rouge_l"],
        "mb_up": r["bytes_up_per_round"] / MB, "mb_down": r["bytes_down_per_round"] / MB,
        "client_gflops": r["client_flops_per_round"] / 1e9, "wall_seconds": r["wall_seconds"],
        "centralized_wall_seconds": r["centralized_wall_seconds"],
    } for r in records]


def table(result_rows: list[dict]) -> str:
    head = ("| method | lr | trainable params | perplexity initial → final | centralized perplexity | "
            "gap (fed − cen) | ROUGE-L initial → final | centralized ROUGE-L | gap (fed − cen) | "
            "exact match final / centralized | MB up / client / round | MB down / client / round | "
            "client GFLOPs / round | wall s (incl. centralized) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result_rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {r['initial_perplexity']:.2f} → "
            f"{r['final_perplexity']:.2f} | {r['centralized_perplexity']:.2f} | {r['perplexity_gap']:+.2f} | "
            f"{r['initial_rouge_l']:.3f} → {r['final_rouge_l']:.3f} | {r['centralized_rouge_l']:.3f} | "
            f"{r['rouge_l_gap']:+.3f} | {r['final_exact_match']:.3f} / {r['centralized_exact_match']:.3f} | "
            f"{r['mb_up']:.3f} | {r['mb_down']:.3f} | {r['client_gflops']:.1f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def plot_perplexity_vs_round(records: list[dict], path: Path) -> None:
    """Held-out perplexity of the global model per round (0 = before training), one line per method; the
    centralized baseline as a cross of the same colour after the last round."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for r in records:
        values = r["perplexity_per_round"]
        (line,) = ax.plot(range(len(values)), values, marker="o", markersize=4, label=r["method"])
        ax.plot([len(values) - 1], [r["centralized_perplexity"]], marker="x", markersize=8, linestyle="none",
                color=line.get_color())
    ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    ax.set_xlabel("round (0 = before training; x = centralized baseline)")
    ax.set_ylabel("held-out response perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _setup(s: GenerativeSetting) -> list[str]:
    template = "the tokenizer's chat template" if s.chat_template else "plain text (no chat template)"
    return [
        f"- Model `{s.model}`; data `{s.dataset}`: {s.max_train} training rows split `{s.partition}` over {s.clients} "
        f"clients (all sampled every round), {s.max_eval} held-out rows; prompts formatted with {template}, at most "
        f"{s.max_length} tokens of prompt plus response; loss on response tokens only.",
        f"- {s.rounds} rounds of {s.local_steps} local AdamW steps of batch {s.batch_size}; seed {s.seed} (one seed). "
        f"Prompt/prefix tuning with {s.num_virtual_tokens} virtual tokens, LoRA rank {s.lora_r}.",
        "- Learning rates " + ", ".join(f"{m} {lr:g}" for m, lr in s.methods) + ": common choices for a ~135M "
        "LM per method, not tuned.",
        f"- Perplexity: exp of the mean loss over the {s.max_eval} held-out responses' tokens. ROUGE-L (F1 of the "
        f"longest common subsequence) and exact match: greedy generations of at most {s.max_new_tokens} tokens for "
        f"the first {s.eval_generations} held-out prompts against their references.",
        "- Centralized baseline: same model, method, optimizer and learning rate from the same start, trained on the "
        "union of the clients' rows for the same number of example passes as the federated run.",
        "- Bytes: the encoded payload (raw fp32 trainable tensors) per client per round. Client FLOPs: one client's "
        "training in one round, counted with torch's FlopCounterMode.",
        f"- Split: the clients run the embeddings, layers [0, {s.cut_layer}) and the LM head (tied to the embeddings); "
        "bytes are every per-batch message plus the client half at the start and end of a round. Distill: "
        f"{s.public_size} public pairs carved out of the training rows (the clients keep the rest), top-{s.topk} "
        "next-token probabilities per public response token up, the global model's own top-k down; LoRA on both "
        "sides; the centralized baseline trains LoRA on the clients' rows.",
    ]


def report(result_rows: list[dict], setting: GenerativeSetting, command: str, machine: dict[str, Any], wall: float,
           records: list[dict]) -> str:
    run_minutes = sum(r["wall_seconds"] or 0.0 for r in records) / 60
    parts = ["# fedcustom bench — preset `generative`", "",
             "Federated instruction tuning of a causal LM: " + ", ".join(METHOD_NAMES.get(m, m) for m, _ in setting.methods)
             + ", each against its centralized baseline.", "",
             f"Command: `{command}`  ", f"Machine: {machine_line(machine)}; "
             f"{len(records)} runs ({sum(r['reused'] for r in records)} reused), "
             f"{run_minutes:.1f} min of runs in all, this invocation {wall / 60:.1f} min.", "", "## Setup", "",
             *_setup(setting), "", "## Results", "",
             "Initial = the pretrained model before any training; final = the global model after the last round; "
             "gap = federated minus centralized (lower perplexity and higher ROUGE-L are better).", "",
             table(result_rows), "", f"![perplexity vs round]({PLOT})", "",
             "Per-round metrics, sample generations and every summary field are in `results.json`; each run's round "
             "log and summary under `runs/`.", ""]
    return "\n".join(parts)
