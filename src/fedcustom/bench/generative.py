"""Report of `fedcustom bench --preset generative` (sweeps/generative.toml): federated instruction tuning of a
causal LM, six methods.

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
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt

from fedcustom.bench.report import MB
from fedcustom.bench.sweep import Sweep, base_value, preamble

METRICS = ("perplexity", "rouge_l", "exact_match")
KEYS = (*(f"{stage}_{m}" for m in METRICS for stage in ("initial", "final", "centralized")),
        *(f"{m}_per_round" for m in METRICS), "bytes_up_per_round", "bytes_down_per_round", "client_flops_per_round",
        "trainable_params", "total_params", "train_examples", "eval_examples", "round_wall_seconds", "wall_seconds")
PLOT = "perplexity_vs_round.png"
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "prompt": "prompt tuning", "prefix": "prefix tuning",
                "split": "U-shaped split learning", "distill": "token-level KD-FedLLM"}


def final_samples(folder: Path) -> list[dict[str, str]]:
    """The sample generations of the last round in the run's round log (none if it has no log)."""
    log = folder / "round_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return json.loads(lines[-1]).get("eval_samples", []) if lines else []


def flat(records: list[dict], runs_dir: Path) -> list[dict[str, Any]]:
    """The sweep's records as one flat record per method, with its final sample generations (from the run's round
    log under ``runs_dir``, the sweep output's runs/ folder)."""
    out = []
    for r in records:
        summary, central = r["summary"], r["summary"].get("centralized") or {}
        out.append({"method": r["labels"]["method"], "lr": summary["learning_rate"], "reused": r["reused"],
                    **{k: summary.get(k) for k in KEYS}, "centralized_wall_seconds": central.get("wall_seconds"),
                    "centralized_flops": central.get("flops"), "samples": final_samples(runs_dir / r["run_dir"])})
    return out


def targets(records: list[dict]) -> list[dict[str, Any]]:
    """The generative comparison states no target: it measures."""
    return []


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


def _setup(sweep: Sweep, records: list[dict]) -> list[str]:
    b = lambda key: base_value(sweep, key)  # noqa: E731
    template = "the tokenizer's chat template" if b("generation.chat_template") else "plain text (no chat template)"
    options = {v.label: v.settings.get("method", {}) for v in sweep.axes["method"]}
    split, distill = options.get("split", {}), options.get("distill", {})
    lines = [
        f"- Model `{b('model.name')}`; data `{b('data.dataset')}`: {b('data.max_train_examples')} training rows split "
        f"`{b('data.partition')}` over {b('federation.clients')} clients (all sampled every round), "
        f"{b('data.max_eval_examples')} held-out rows; prompts formatted with {template}, at most "
        f"{b('model.max_length')} tokens of prompt plus response; loss on response tokens only.",
        f"- {b('federation.rounds')} rounds of {b('federation.local_steps')} local AdamW steps of batch "
        f"{b('train.batch_size')}; seed {b('train.seed')} (one seed). Prompt/prefix tuning with "
        f"{b('method.num_virtual_tokens')} virtual tokens, LoRA rank {b('method.lora_r')}.",
        "- Learning rates " + ", ".join(f"{r['method']} {r['lr']:g}" for r in records) + ": common choices for a "
        "~135M LM per method, not tuned.",
        f"- Perplexity: exp of the mean loss over the {b('data.max_eval_examples')} held-out responses' tokens. "
        f"ROUGE-L (F1 of the longest common subsequence) and exact match: greedy generations of at most "
        f"{b('generation.max_new_tokens')} tokens for the first {b('generation.eval_generations')} held-out prompts "
        "against their references.",
        "- Centralized baseline: same model, method, optimizer and learning rate from the same start, trained on the "
        "union of the clients' rows for the same number of example passes as the federated run.",
        "- Bytes: the encoded payload (raw fp32 trainable tensors) per client per round. Client FLOPs: one client's "
        "training in one round, counted with torch's FlopCounterMode.",
    ]
    if split:
        head = ("and the LM head (tied to the embeddings)" if split.get("split_head") == "client"
                else "; the server runs the layers above and the LM head")
        lines.append(f"- Split: the clients run the embeddings, layers [0, {split.get('cut_layer')}) {head}; bytes are "
                     "every per-batch message plus the client half at the start and end of a round.")
    if distill:
        local = {"lora": "LoRA", "full": "full fine-tuning"}.get(distill.get("local_method", "lora"),
                                                                distill.get("local_method"))
        lines.append(f"- Distill: {distill.get('public_size')} public pairs carved out of the training rows (the "
                     f"clients keep the rest), top-{distill.get('topk')} next-token probabilities per public response "
                     f"token up, the global model's own top-k down; {local} on both sides; the centralized baseline "
                     f"trains {local} on the clients' rows.")
    return lines


def report(sweep: Sweep, stages: dict[str, list[dict]], result: dict[str, Any], out: Path) -> str:
    """report.md: setup, one row per method (initial, final and centralized metrics, bytes, FLOPs) and the plot."""
    records = flat([r for stage in stages.values() for r in stage], out / "runs")
    result_rows = rows(records)
    if records:
        plot_perplexity_vs_round(records, out / PLOT)
    parts = [*preamble(sweep, result), "## Setup", "", *_setup(sweep, records), "", "## Results", "",
             "Initial = the pretrained model before any training; final = the global model after the last round; "
             "gap = federated minus centralized (lower perplexity and higher ROUGE-L are better).", "",
             table(result_rows), "", f"![perplexity vs round]({PLOT})", "",
             "Per-round metrics and every summary field are in `results.json`; each run's round log (with the sample "
             "generations) and summary under `runs/`.", ""]
    return "\n".join(parts)
