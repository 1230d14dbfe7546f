"""`fedcustom run`: build everything from a RunConfig, run the rounds, write the results.

Output folder:
  round_log.jsonl   one line per round (round 0 = initial model)
  summary.json      the headline numbers, per-client data stats, config and versions
  adapter/          final global adapter in PEFT format (``model/`` for full fine-tuning)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from peft import PeftModel
from rich.console import Console
from torch import nn

from fedcustom.centralized import run_converged, run_same_passes
from fedcustom.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedcustom.client import TrainingClient
from fedcustom.codecs import Codec, get_codec
from fedcustom.config import RunConfig, build_config
from fedcustom.convergence import EarlyStop, check_convergence_support, convergence_for, local_schedule, resolved_settings
from fedcustom.data import FederatedData, PublicSpec, prepare_data
from fedcustom.errors import FedCustomError
from fedcustom.methods import Method, get_method, load_trainable_state, save_trained, trainable_state
from fedcustom.models import load_model, load_tokenizer
from fedcustom.report import (
    TASK_METRICS, RoundLog, clients_table, result_from_record, round_line, round_progress, round_record, rounds_table, write_json,
)
from fedcustom.runtime import ClientSetup, EmbeddedRuntime, Handler, Runtime, SimulatedFaults
from fedcustom.server import FederatedServer, RoundDriver, RoundResult
from fedcustom.summary import summarize
from fedcustom.trust import check_trust_support, client_tables, clients_per_round, safeguards_for
from fedcustom.strategies import Strategy, get_strategy
from fedcustom.training import LocalSchedule, evaluate


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
    evaluate_model: Callable[[], dict[str, Any]]  # the task's metrics of ``model`` as it is now

    def checkpoint_parts(self) -> dict[str, Any]:
        """What a checkpoint must hold: the server, and the state of clients that live in this process."""
        parts: dict[str, Any] = {"server": self.server}
        runtime = getattr(self.server, "runtime", None)
        if isinstance(runtime, EmbeddedRuntime) and hasattr(runtime.handler, "state_dict"):
            parts["clients"] = runtime.handler
        return parts

    @property
    def eval_batch(self) -> int:
        return 2 * self.cfg.train.batch_size

    def client_stats(self) -> list[dict]:
        """Each client's rows and label histogram: as the SuperNodes describe their own files in a deployment,
        else from the partition of the run's dataset."""
        reported = getattr(getattr(self.server, "runtime", None), "node_stats", None)
        if reported:
            return [reported[p] for p in sorted(reported)]
        return self.data.client_stats()

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


RuntimeFactory = Callable[[Handler, ClientSetup], Runtime]  # (the in-process client handler, what clients must know)


def embedded_runtime(cfg: RunConfig) -> RuntimeFactory:
    """The default: every client is called in this process (with simulated failures and latency if asked)."""
    fed = cfg.federation
    faults = None
    if fed.client_failure_rate or fed.client_latency:
        faults = SimulatedFaults(fed.client_failure_rate, fed.client_latency, fed.round_timeout, cfg.train.seed)
    return lambda handler, _labels: EmbeddedRuntime(handler, fed.clients, faults)


def check_runtime_support(cfg: RunConfig) -> None:
    """A clear error, before any Flower process starts, for what a run cannot do (trust features that are
    simulated in this process only; codec chains, server optimizers and drift correction on methods that send
    activations or logits)."""
    method = get_method(cfg.method.name)
    check_trust_support(cfg, method)
    check_convergence_support(cfg, method)
    codecs_for(cfg, method)


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
    data = prepare_task_data(cfg, method, tokenizer)
    backbone = load_model(cfg.model.name, cfg.model.task, data.label_names, tokenizer, cfg.train.seed)
    model = method.build(backbone, cfg.method, cfg.model.task, tokenizer)
    initial = trainable_state(model)
    schedule = local_schedule(cfg, method)

    evaluate_model = task_evaluator(cfg, model, data, tokenizer)

    def evaluate_state(state: dict[str, torch.Tensor]) -> dict[str, float]:
        load_trainable_state(model, state)
        return evaluate_model()

    tables, adversary = client_tables(cfg, data)
    setup = ClientSetup(data.label_names, data.public)
    if method.protocol == "split":
        server = build_split_server(cfg, model, tokenizer, codec, strategy, schedule, tables, evaluate_model,
                                    lambda handler: runtime(handler, setup))
    elif method.protocol == "distill":
        from fedcustom.methods.distill.federated import build_distill_server

        server = build_distill_server(cfg, model, tokenizer, data, codec, schedule, clients_per_round(cfg),
                                      evaluate_model, lambda handler: runtime(handler, setup))
    else:
        client = TrainingClient(model, tokenizer, codec, tables, codec_down, adversary)
        server = FederatedServer(
            runtime(client, setup), strategy, codec, initial, evaluate_state, schedule,
            clients_per_round(cfg), cfg.train.seed, codec_down, cfg.federation.min_available, safeguards_for(cfg),
            convergence_for(cfg, method, schedule),
        )
    return Job(cfg, method, model, tokenizer, data, initial, schedule, server, out, evaluate_model)


def prepare_task_data(cfg: RunConfig, method: Method, tokenizer: Any) -> FederatedData:
    """Labelled texts (classification) or instruction rows (causal LM), split over the clients."""
    fed, seed = cfg.federation, cfg.train.seed
    public = PublicSpec(cfg.method.public_size, cfg.method.public_dataset) if method.protocol == "distill" else None
    if cfg.model.task == "causal-lm":
        from fedcustom.data.causal import prepare_causal_data

        tokenizer.padding_side = "right"  # training batches; generation pads on the left itself
        return prepare_causal_data(cfg.data, fed.clients, seed, tokenizer, cfg.model.max_length,
                                   cfg.generation.chat_template, public)
    return prepare_data(cfg.data, fed.clients, seed, tokenizer, cfg.model.max_length, public)


def task_evaluator(cfg: RunConfig, model: nn.Module, data: FederatedData, tokenizer: Any) -> Callable[[], dict]:
    """Accuracy and macro-F1 (classification); perplexity, exact match and ROUGE-L of generations (causal LM)."""
    batch = 2 * cfg.train.batch_size
    if cfg.model.task == "causal-lm":
        from fedcustom.causal_lm import GenerationSettings, evaluate_causal

        gen = cfg.generation
        settings = GenerationSettings(gen.max_new_tokens, gen.eval_generations, gen.samples)
        return lambda: evaluate_causal(model, data, tokenizer, batch, settings)
    return lambda: evaluate(model, data.eval, tokenizer, batch)


def build_split_server(cfg: RunConfig, model: nn.Module, tokenizer: Any, codec: Codec, strategy: Strategy,
                       schedule: LocalSchedule, tables: dict[int, datasets.Dataset],
                       evaluate_global: Callable[[], dict[str, float]],
                       runtime: Callable[[Handler], Runtime] | None = None) -> RoundDriver:
    """SplitFed (methods/split): per-batch exchanges through the run's runtime (default: embedded)."""
    from fedcustom.methods.split import cut_model
    from fedcustom.methods.split.federated import SplitFederatedServer
    from fedcustom.methods.split.protocol import SplitClient, SplitServer

    split = cut_model(model, cfg.method.cut_layer, head_on_client=cfg.method.split_head == "client")
    client = SplitClient(split, tokenizer, codec, tables)
    carrier = runtime(client) if runtime else EmbeddedRuntime(client, cfg.federation.clients)
    inner = SplitServer(carrier, split, strategy, codec, schedule, cfg.train.seed)
    return SplitFederatedServer(inner, clients_per_round(cfg), cfg.train.seed, evaluate_global)


def run_rounds(job: Job, console: Console, show: bool, resumed: Checkpoint | None = None) -> list[RoundResult]:
    """Round 0 (initial evaluation) and every federated round, logged and checkpointed as each ends; a resumed
    run starts after the checkpoint's round."""
    results = [result_from_record(r) for r in resumed.records] if resumed else [job.server.evaluate_initial()]
    round_log = RoundLog(job.out / "round_log.jsonl", results)
    parts = job.checkpoint_parts() if job.cfg.output.checkpoint else {}
    earlier, start = (resumed.wall_seconds if resumed else 0.0), time.perf_counter()

    def checkpoint(rnd: int) -> None:
        if parts:
            save_checkpoint(job.out, rnd, job.cfg.to_dict(), [round_record(r) for r in results],
                            earlier + time.perf_counter() - start, parts)

    if not resumed:
        checkpoint(0)
    stop = early_stop(job.cfg)
    rounds, per_round, first = job.cfg.federation.rounds, job.server.clients_per_round, len(results)
    if stop and len(results) > 1 and stop.should_stop(results):
        return results  # a resumed run that had already stopped early
    live = show and console.is_terminal  # a log gets one plain line per round instead of a live bar
    with round_progress(console, rounds, per_round, live) as progress:
        if progress:
            progress.update(0, completed=first - 1)
        for rnd in range(first, rounds + 1):
            if progress:
                progress.reset(1)
            on_reply = (lambda _node: progress.advance(1)) if progress else None
            results.append(job.server.run_round(rnd, on_reply))
            round_log.write(results[-1])
            checkpoint(rnd)
            if progress:
                progress.advance(0)
            if show and not live:
                console.print(round_line(results[-1], rounds, job.cfg.model.task))
            if stop and stop.should_stop(results):
                if show:
                    console.print(f"early stop after round {rnd}: no gain in {stop.metric} for {stop.patience} rounds "
                                  f"(best: round {stop.best_round(results)})")
                break
    return results


def early_stop(cfg: RunConfig) -> EarlyStop | None:
    """The run's early-stopping rule on its task's headline metric, or None."""
    patience = cfg.federation.early_stop_patience
    if patience is None:
        return None
    metric = TASK_METRICS[cfg.model.task][0][0]
    return EarlyStop(metric, True, patience, cfg.federation.early_stop_min_delta)


def run_baselines(job: Job, results: list[RoundResult], console: Console | None) -> dict[str, dict[str, Any]]:
    """The centralized baselines the config asks for ("same_passes", "converged"); the global state is loaded
    back into the model afterwards."""
    cfg, baselines = job.cfg, {}
    status = console.status if console else (lambda _text: contextlib.nullcontext())
    if cfg.train.centralized:
        passes = sum(r.examples_seen for r in results)
        with status("training the centralized baseline (same example passes)"):
            baselines["same_passes"] = run_same_passes(job.model, job.initial, job.data, job.tokenizer, job.schedule,
                                                       passes, cfg.train.seed, job.evaluate_model)
    if cfg.train.centralized_converged:
        with status("training the centralized baseline to convergence"):
            baselines["converged"] = run_converged(cfg, job.model, job.initial, job.data, job.tokenizer, job.schedule,
                                                   job.evaluate_model)
    load_trainable_state(job.model, job.server.global_state)
    return baselines


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


def resume(path: str, console: Console | None = None) -> dict[str, Any]:
    """`fedcustom run --resume DIR`: rebuild the job from DIR's checkpoint and run the rounds still to do."""
    start = time.perf_counter()
    out = Path(path).expanduser()
    checkpoint = load_checkpoint(out)
    values = checkpoint.config
    values["output"]["dir"] = str(out)  # the folder may have moved since
    job = build_job(build_config(values))
    parts = job.checkpoint_parts()
    if set(parts) != set(checkpoint.parts):
        raise FedCustomError(f"--resume {path}: the checkpoint holds {sorted(checkpoint.parts)}, this job needs "
                             f"{sorted(parts)}")
    for name, part in parts.items():
        part.load_state_dict(*checkpoint.parts[name])
    torch.set_rng_state(checkpoint.rng_state)  # after build_job, which seeds model initialisation
    return execute(job, console, start, checkpoint)


def execute(job: Job, console: Console | None = None, start: float | None = None,
            resumed: Checkpoint | None = None) -> dict[str, Any]:
    """Train a built job (from a checkpoint when resuming), save the global adapter, run the baseline, write and
    print results."""
    start = time.perf_counter() if start is None else start
    console = console or default_console()
    cfg = job.cfg
    show = not cfg.output.quiet
    if show:
        console.print(clients_table(job.client_stats(), job.data.label_names))
    results = run_rounds(job, console, show, resumed)
    load_trainable_state(job.model, job.server.global_state)
    if cfg.output.save_model:
        (job.method.save or save_trained)(job.model, job.model_dir)
        job.tokenizer.save_pretrained(job.model_dir)
    baselines = run_baselines(job, results, console if show else None)
    wall = time.perf_counter() - start + (resumed.wall_seconds if resumed else 0.0)
    summary = summarize(cfg, results, baselines, job.model, job.initial, job.data, wall,
                        resolved_settings(cfg, job.method, job.schedule), job.client_stats(), early_stop(cfg))
    write_json(job.out / "summary.json", summary)
    if show:
        console.print(rounds_table(results, baselines, cfg.model.task))
        console.print(f"wall time {summary['wall_seconds']:.1f} s; results in {job.out}")
    return summary
