"""`fedcustom run`: build everything from a RunConfig, run the rounds, write the results.

Output folder:
  round_log.jsonl   one line per round (round 0 = initial model)
  summary.json      the headline numbers, per-client data stats, config and versions
  adapter/          final global adapter in PEFT format (``model/`` for full fine-tuning)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from peft import PeftModel
from rich.console import Console
from torch import nn

from fedcustom.client import TrainingClient
from fedcustom.codecs import Codec, get_codec, is_stateless
from fedcustom.config import RunConfig
from fedcustom.data import FederatedData, PublicSpec, prepare_data
from fedcustom.errors import FedCustomError
from fedcustom.methods import Method, get_method, load_trainable_state, save_trained, trainable_state
from fedcustom.models import load_model, load_tokenizer
from fedcustom.report import RoundLog, clients_table, mean, round_line, round_progress, rounds_table, write_json
from fedcustom.runtime import EmbeddedRuntime, Handler, Runtime
from fedcustom.server import FederatedServer, RoundDriver, RoundResult
from fedcustom.strategies import Strategy, get_strategy
from fedcustom.training import LocalSchedule, derive_seed, evaluate, train_local

CENTRALIZED_STREAM = 2  # seed stream of the centralized baseline
PAYLOAD_NOTES = {
    "parameter_sharing": "bytes are the encoded safetensors payload of the method's trainable tensors, task head included",
    "split": "bytes are every per-batch message (activations, masks and labels up; gradients down) plus the client "
             "half's weights at the start and end of a round; server FLOPs are per client served",
    "distill": "bytes up are the encoded logits (or top-k soft labels) on the public set; bytes down the broadcast "
               "(global soft labels, or the global adapter); server FLOPs (distillation) are split evenly over the "
               "clients whose knowledge was used",
}


def prepare_output(path: str) -> Path:
    """Create the output folder and prove it is writable before any training starts."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FedCustomError(f"output directory {path}: not writable ({exc.strerror or exc})") from None
    return out


def clients_per_round(cfg: RunConfig) -> int:
    """Explicit count, else the sampled fraction of clients (at least one)."""
    fed = cfg.federation
    return fed.clients_per_round or max(1, round(fed.fraction * fed.clients))


def local_schedule(cfg: RunConfig, method: Method) -> LocalSchedule:
    """The per-round client schedule; the learning rate defaults to the method's."""
    return LocalSchedule(
        lr=cfg.train.lr or method.default_lr(cfg.method), batch_size=cfg.train.batch_size,
        epochs=cfg.federation.local_epochs, steps=cfg.federation.local_steps,
        weight_decay=cfg.train.weight_decay, count_flops=cfg.train.count_flops,
    )


def run_centralized(
    model: nn.Module, initial: dict[str, torch.Tensor], data: FederatedData, tokenizer: Any,
    schedule: LocalSchedule, example_passes: int, seed: int, eval_batch: int,
) -> dict[str, float]:
    """Same model, method and optimizer from the same start, on the union of client data, for the
    same number of example passes as the federated run (one optimizer across all steps)."""
    start = time.perf_counter()
    load_trainable_state(model, initial)
    union = data.train.select(sorted(itertools.chain.from_iterable(data.client_indices)))
    exact = dataclasses.replace(schedule, steps=None, examples=example_passes)
    result = train_local(model, union, tokenizer, exact, derive_seed(seed, CENTRALIZED_STREAM))
    metrics = evaluate(model, data.eval, tokenizer, eval_batch)
    return {
        **metrics, "train_loss": result.mean_loss, "steps": result.steps, "examples_seen": result.examples_seen,
        "flops": result.flops, "wall_seconds": time.perf_counter() - start,
    }


def versions() -> dict[str, str]:
    """Library versions and machine, so a result says what produced it."""
    libs = {name: version(name) for name in ("fedcustom", "torch", "transformers", "peft", "datasets", "flwr-datasets")}
    return {**libs, "python": platform.python_version(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "cpu_threads": str(torch.get_num_threads())}


def summarize(
    cfg: RunConfig, results: list[RoundResult], centralized: dict[str, float] | None,
    model: nn.Module, initial: dict[str, torch.Tensor], data: FederatedData, wall: float, lr: float,
) -> dict[str, Any]:
    """The headline numbers (per client per round unless a key says total)."""
    rounds = results[1:]
    up = [b for r in rounds for b in r.bytes_up.values()]
    down = [b for r in rounds for b in r.bytes_down.values()]
    flops = [f for r in rounds for f in r.client_flops.values()]
    server_flops = [f for r in rounds for f in r.server_flops.values()]
    trainable = sum(t.numel() for t in initial.values())
    return {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "partition": cfg.data.partition,
        "clients": cfg.federation.clients,
        "clients_per_round": clients_per_round(cfg),
        "rounds": len(rounds),
        "learning_rate": lr,
        "initial_accuracy": results[0].eval["accuracy"],
        "final_accuracy": results[-1].eval["accuracy"],
        "final_macro_f1": results[-1].eval["macro_f1"],
        "accuracy_per_round": [r.eval["accuracy"] for r in results],  # index 0 = the initial model
        "round_wall_seconds": [r.wall_seconds for r in rounds],
        "centralized_accuracy": centralized["accuracy"] if centralized else None,
        "centralized_macro_f1": centralized["macro_f1"] if centralized else None,
        "centralized": centralized,
        "bytes_up_per_round": mean(up),
        "bytes_down_per_round": mean(down),
        "bytes_up_total": sum(up),
        "bytes_down_total": sum(down),
        "payload_note": PAYLOAD_NOTES[get_method(cfg.method.name).protocol],
        "codec_up": str(getattr(get_codec(cfg.codec.up), "name", cfg.codec.up)),
        "codec_down": str(getattr(get_codec(cfg.codec.down or cfg.codec.up), "name", cfg.codec.down or cfg.codec.up)),
        "client_flops_per_round": mean(flops),
        "server_flops_per_round": mean(server_flops) if server_flops else None,  # per client served (split, distill)
        "public_examples": len(data.public) if data.public else None,
        "trainable_params": trainable,
        "trainable_bytes_fp32": sum(t.numel() * 4 for t in initial.values()),
        "total_params": sum(p.numel() for p in model.parameters()),
        "rejected_updates": sum(len(r.rejected) for r in rounds),
        "wall_seconds": wall,
        "train_examples": sum(len(rows) for rows in data.client_indices),
        "eval_examples": len(data.eval),
        "label_names": data.label_names,
        "client_data": data.client_stats(),
        "config": cfg.to_dict(),
        "versions": versions(),
    }


@dataclass
class Job:
    """A built federated job: the shared model, the data, and the server that drives it."""

    cfg: RunConfig
    method: Method
    model: nn.Module
    tokenizer: Any
    data: FederatedData
    initial: dict[str, torch.Tensor]
    schedule: LocalSchedule
    server: RoundDriver  # FederatedServer, or SplitFederatedServer for --method split
    out: Path

    @property
    def eval_batch(self) -> int:
        return 2 * self.cfg.train.batch_size

    @property
    def model_dir(self) -> Path:
        """Where the final global adapter (PEFT methods) or whole model (full, split) is saved."""
        whole = self.method.saves_whole_model or not isinstance(self.model, PeftModel)
        return self.out / ("model" if whole else "adapter")


def codecs_for(cfg: RunConfig, method: Method) -> tuple[Codec, Codec]:
    """(client-to-server, server-to-client) codecs; chains apply to parameter-sharing methods only."""
    up, down = cfg.codec.up, cfg.codec.down or cfg.codec.up
    if method.protocol != "parameter_sharing" and (up, down) != ("raw", "raw"):
        raise FedCustomError(f"--codec {up} / --codec-down {down}: codec chains apply to parameter-sharing methods "
                             f"(full, lora, prompt, prefix); {method.name} sends activations or logits raw")
    return get_codec(up, "codec.up (--codec)"), get_codec(down, "codec.down (--codec-down)")


RuntimeFactory = Callable[[Handler, list[str]], Runtime]  # (the in-process client handler, label names) -> runtime


def embedded_runtime(cfg: RunConfig) -> RuntimeFactory:
    """The default: every client is called in this process."""
    return lambda handler, _labels: EmbeddedRuntime(handler, cfg.federation.clients)


def check_runtime_support(cfg: RunConfig) -> None:
    """A clear error, before any Flower process starts, for what the Flower runtimes cannot run yet."""
    runtime, method = cfg.federation.runtime, get_method(cfg.method.name)
    if runtime != "embedded" and method.protocol != "parameter_sharing":
        raise FedCustomError(f"--runtime {runtime}: --method {method.name} keeps per-client state between messages, "
                             f"which Flower runtimes do not carry yet; use --runtime embedded")
    codec, codec_down = codecs_for(cfg, method)
    if runtime == "flower" and not (is_stateless(codec) and is_stateless(codec_down)):
        raise FedCustomError(f"--codec {cfg.codec.up} / --codec-down {cfg.codec.down or cfg.codec.up}: on a SuperLink "
                             f"each message runs in a fresh ClientApp process, which cannot keep a delta reference "
                             f"or a top-k residual; use stateless stages (fp16|bf16|int8|int4, zstd) or --runtime "
                             f"flower-sim")


def build_job(cfg: RunConfig, runtime: RuntimeFactory | None = None) -> Job:
    """Load tokenizer, data and model; wire clients, runtime and server. No training yet.

    ``runtime`` carries the messages (default: embedded); a runtime whose clients live elsewhere (Flower)
    ignores the in-process handler it is given."""
    check_runtime_support(cfg)
    method, strategy = get_method(cfg.method.name), get_strategy(cfg.federation.strategy)
    runtime = runtime or embedded_runtime(cfg)
    codec, codec_down = codecs_for(cfg, method)
    out = prepare_output(cfg.output.dir)
    tokenizer = load_tokenizer(cfg.model.name)
    public = PublicSpec(cfg.method.public_size, cfg.method.public_dataset) if method.protocol == "distill" else None
    data = prepare_data(cfg.data, cfg.federation.clients, cfg.train.seed, tokenizer, cfg.model.max_length, public)
    backbone = load_model(cfg.model.name, cfg.model.task, data.label_names, tokenizer, cfg.train.seed)
    model = method.build(backbone, cfg.method, cfg.model.task)
    initial = trainable_state(model)
    schedule = local_schedule(cfg, method)

    def evaluate_model() -> dict[str, float]:
        return evaluate(model, data.eval, tokenizer, 2 * cfg.train.batch_size)

    def evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
        load_trainable_state(model, state)
        return evaluate_model()

    tables = {i: data.client_table(i) for i in range(cfg.federation.clients)}
    if method.protocol == "split":
        server = build_split_server(cfg, model, tokenizer, codec, strategy, schedule, tables, evaluate_model)
    elif method.protocol == "distill":
        from fedcustom.methods.distill.federated import build_distill_server

        server = build_distill_server(cfg, model, tokenizer, data, codec, schedule, clients_per_round(cfg),
                                      evaluate_model)
    else:
        server = FederatedServer(
            runtime(TrainingClient(model, tokenizer, codec, tables, codec_down), data.label_names),
            strategy, codec, initial, evaluate_state, schedule, clients_per_round(cfg), cfg.train.seed, codec_down,
            cfg.federation.min_available,
        )
    return Job(cfg, method, model, tokenizer, data, initial, schedule, server, out)


def build_split_server(cfg: RunConfig, model: nn.Module, tokenizer: Any, codec: Codec, strategy: Strategy,
                       schedule: LocalSchedule, tables: dict[int, datasets.Dataset],
                       evaluate_global: Callable[[], dict[str, float]]) -> RoundDriver:
    """SplitFed (methods/split): per-batch exchanges through the same embedded runtime."""
    from fedcustom.methods.split import cut_model
    from fedcustom.methods.split.federated import SplitFederatedServer
    from fedcustom.methods.split.protocol import SplitClient, SplitServer

    split = cut_model(model, cfg.method.cut_layer, head_on_client=cfg.method.split_head == "client")
    runtime = EmbeddedRuntime(SplitClient(split, tokenizer, codec, tables), cfg.federation.clients)
    inner = SplitServer(runtime, split, strategy, codec, schedule, cfg.train.seed)
    return SplitFederatedServer(inner, clients_per_round(cfg), cfg.train.seed, evaluate_global)


def run_rounds(job: Job, console: Console, show: bool) -> list[RoundResult]:
    """Round 0 (initial evaluation) and every federated round, logged as each ends."""
    round_log = RoundLog(job.out / "round_log.jsonl")
    results = [job.server.evaluate_initial()]
    round_log.write(results[0])
    rounds, per_round = job.cfg.federation.rounds, job.server.clients_per_round
    live = show and console.is_terminal  # a log gets one plain line per round instead of a live bar
    with round_progress(console, rounds, per_round, live) as progress:
        for rnd in range(1, rounds + 1):
            if progress:
                progress.reset(1)
            on_reply = (lambda _node: progress.advance(1)) if progress else None
            results.append(job.server.run_round(rnd, on_reply))
            round_log.write(results[-1])
            if progress:
                progress.advance(0)
            if show and not live:
                console.print(round_line(results[-1], rounds))
    return results


def default_console() -> Console:
    """A console that does not squeeze tables into 80 columns when writing to a log."""
    console = Console()
    if not console.is_terminal:
        console.width = 150
    return console


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the federated job (and the centralized baseline when asked); return the summary."""
    start = time.perf_counter()
    if cfg.federation.runtime == "flower-sim":
        from fedcustom.runtime.flower.sim import run_flower_simulation  # flwr loads only for Flower runs

        check_runtime_support(cfg)
        return run_flower_simulation(cfg)
    if cfg.federation.runtime == "flower":
        raise FedCustomError("--runtime flower runs as a ServerApp on a SuperLink: submit it with "
                             "`fedcustom submit --superlink HOST:8000 --config FILE` (see README, Deploy across machines)")
    return execute(build_job(cfg), console, start)


def execute(job: Job, console: Console | None = None, start: float | None = None) -> dict[str, Any]:
    """Train a built job, save the global adapter, run the baseline, write and print results."""
    start = time.perf_counter() if start is None else start
    console = console or default_console()
    cfg = job.cfg
    show = not cfg.output.quiet
    if show:
        console.print(clients_table(job.data.client_stats(), job.data.label_names))
    results = run_rounds(job, console, show)
    load_trainable_state(job.model, job.server.global_state)
    if cfg.output.save_model:
        (job.method.save or save_trained)(job.model, job.model_dir)
        job.tokenizer.save_pretrained(job.model_dir)
    centralized = None
    if cfg.train.centralized:
        passes = sum(r.examples_seen for r in results)
        with console.status("training the centralized baseline") if show else contextlib.nullcontext():
            centralized = run_centralized(
                job.model, job.initial, job.data, job.tokenizer, job.schedule, passes, cfg.train.seed, job.eval_batch
            )
        load_trainable_state(job.model, job.server.global_state)
    wall = time.perf_counter() - start
    summary = summarize(cfg, results, centralized, job.model, job.initial, job.data, wall, job.schedule.lr)
    write_json(job.out / "summary.json", summary)
    if show:
        console.print(rounds_table(results, centralized))
        console.print(f"wall time {summary['wall_seconds']:.1f} s; results in {job.out}")
    return summary
