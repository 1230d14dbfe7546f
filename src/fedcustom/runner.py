"""`fedcustom run`: build the job (:mod:`fedcustom.assemble`), run the rounds, write the results.

Output folder:
  round_log.jsonl   one line per round (round 0 = initial model)
  summary.json      the headline numbers, per-client data stats, config and versions
  adapter/          final global adapter in PEFT format (``model/`` for full fine-tuning)
  clients/<id>/     --personalize (but finetune): each client's own adapter, its private tensors in place
                    (dual-lora: the global adapter with the client's ``personal/`` one beside it)
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch
from rich.console import Console

from fedcustom.assemble import Job, RuntimeFactory, build_job, held_out_fraction
from fedcustom.centralized import run_converged, run_same_passes
from fedcustom.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint, save_checkpoint
from fedcustom.codecs import RawCodec, raw_size
from fedcustom.config import RunConfig, build_config
from fedcustom.convergence import EarlyStop, moved_settings, resolved_settings
from fedcustom.device import model_device, peak_memory_mb
from fedcustom.errors import FedCustomError
from fedcustom.report import (
    TASK_METRICS, RoundLog, clients_table, result_from_record, round_line, round_progress, round_record, rounds_table, write_json,
)
from fedcustom.rounds import RoundResult
from fedcustom.saving import write_model_folder
from fedcustom.runtime import ClientSetup, Message, Reply
from fedcustom.summary import summarize
from fedcustom.tracking import Trackers
from fedcustom.wire import EVALUATE, SAVE, client_eval_config

__all__ = ["build_job", "execute", "resume", "run"]  # build_job: the assembler's, re-exported for the run API
log = logging.getLogger(__name__)


def evaluate_clients(job: Job, result: RoundResult) -> None:
    """With per-client evaluation on: every client scores the round's global model on the rows it holds out (its
    task's headline metric) into ``result.client_eval``, and with --personalize its own model into
    ``result.client_eval_personal``, answering an evaluate message (:func:`to_every_node`; clients on Flower nodes
    score on their own rows). A client that fails or does not answer is left out of this round's scores."""
    if not held_out_fraction(job.cfg):
        return
    for node, reply in to_every_node(job, EVALUATE, result.round, eval_config(job), result.bytes_eval):
        result.bytes_eval[node] += len(reply.payload)
        if reply.error:
            log.warning("client %d did not evaluate round %d: %s", node, result.round, reply.error)
            continue
        if "client_eval" in reply.metrics:
            result.client_eval[node] = float(reply.metrics["client_eval"])
        if "client_eval_personal" in reply.metrics:
            result.client_eval_personal[node] = float(reply.metrics["client_eval_personal"])
    if job.server.runtime.local_handler is not None:
        job.load_model()  # the in-process clients left their own models in the shared one


def eval_config(job: Job) -> dict:
    """The evaluate message's settings: --personalize finetune:K's local steps (none for the other modes)."""
    personal = job.personalization
    return client_eval_config(job.schedule, job.cfg.train.seed,
                              personal.finetune_steps if personal.mode == "finetune" else 0)


def to_every_node(job: Job, kind: str, rnd: int, config: dict,
                  sent: dict[int, int] | None = None) -> Iterator[tuple[int, Reply]]:
    """One ``kind`` message with the global tensors (raw, off the codec links) to every node the runtime still
    has, and their replies in node order; ``sent`` gets each node's message payload bytes. The embedded runtime's
    clients are called directly: its simulated faults are the training messages'."""
    payload = RawCodec().encode(job.server.global_state)
    runtime = job.server.runtime
    messages = {node: Message(kind, rnd, payload, config) for node in runtime.nodes()}
    if sent is not None:
        sent.update({node: len(payload) for node in messages})
    local = runtime.local_handler
    if local is None:
        yield from runtime.stream(messages)
    else:
        yield from ((node, local(node, message)) for node, message in messages.items())


def save_global_model(job: Job) -> None:
    """The global adapter (PEFT methods) or whole model (full fine-tuning, and LoRA with --lora-aggregation stack:
    the merged backbone); dual-lora's personal adapter is each client's own (saved
    under clients/<id>/ beside the global one), so the global folder holds the global adapter only."""
    dual = job.personalization.mode == "dual-lora"
    write_model_folder(job.cfg, job.method, job.model, job.tokenizer, job.model_dir,
                       [job.model.active_adapter] if dual else None)


def save_client_models(job: Job) -> int:
    """``--personalize`` with private tensors: each client's own model under ``clients/<id>/`` (PEFT adapter
    format for adapter methods), then the global model back in place. Clients on Flower nodes write theirs on their
    own machines (a save message), under the node config's ``output-dir`` or else this run's output folder. Returns
    the save messages' bytes (the embedded runtime's clients save in this process: what a deployment would send,
    the global tensors to each client that keeps private ones)."""
    clients = job.server.runtime.local_handler
    if clients is None:
        return save_on_nodes(job) if job.personalization.keeps_private else 0
    private = sorted(getattr(clients, "private", {}))
    for client in private:
        job.load_model(client)
        clients.save_model(job.out / "clients" / str(client) / job.model_dir.name)
    job.load_model()
    return len(private) * raw_size(job.server.global_state) if private else 0


def setup_bytes(job: Job) -> int:
    """The client setup's bytes (label names; distillation's public texts), sent once to each client before the
    first round: what the Flower runtime sent with its hellos (again to a node that rejoined), or what a
    deployment would send (embedded)."""
    carrier = job.server.runtime
    if carrier.local_handler is None and hasattr(carrier, "setup_bytes"):
        return int(carrier.setup_bytes)
    return job.cfg.federation.clients * ClientSetup(job.data.label_names, job.data.public).wire_bytes()


def save_on_nodes(job: Job) -> int:
    """Each Flower node saves its own model where it runs; a node that fails is logged, the run still ends. Returns
    the save messages' bytes (their replies carry only the folder a node wrote to)."""
    config = {"folder": str(job.out), "model_dir": job.model_dir.name}
    sent: dict[int, int] = {}
    for node, reply in to_every_node(job, SAVE, job.cfg.federation.rounds, config, sent):
        if reply.error:
            log.warning("client %d did not save its own model: %s", node, reply.error)
        else:
            log.info("client %d saved its own model to %s (on its machine)", node, reply.payload.decode())
    return sum(sent.values())


def run_rounds(job: Job, console: Console, show: bool, resumed: Checkpoint | None = None,
               on_round: Callable[[dict[str, Any]], None] = lambda _record: None) -> list[RoundResult]:
    """Round 0 (initial evaluation) and every federated round, logged and checkpointed as each ends (``on_round``
    gets each round's record, a resumed run's earlier ones first); a resumed run starts after the checkpoint's
    round."""
    device = model_device(job.model)
    results = [result_from_record(r) for r in resumed.records] if resumed else [job.server.evaluate_initial()]
    if not resumed:
        results[0].memory = peak_memory_mb(device)
        evaluate_clients(job, results[0])
    round_log = RoundLog(job.out / "round_log.jsonl", results)
    for result in results:
        on_round(round_record(result))
    parts = job.checkpoint_parts() if job.cfg.output.checkpoint else {}
    earlier, start = (resumed.wall_seconds if resumed else 0.0), time.perf_counter()
    settings = resolved_settings(job.cfg, job.method, job.schedule)

    def checkpoint(rnd: int) -> None:
        if parts:
            save_checkpoint(job.out, rnd, job.cfg.to_dict(), [round_record(r) for r in results],
                            earlier + time.perf_counter() - start, parts, resumed_after(resumed), settings)

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
            evaluate_clients(job, results[-1])
            results[-1].memory = peak_memory_mb(device)
            round_log.write(results[-1])
            on_round(round_record(results[-1]))
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


def resumed_after(resumed: Checkpoint | None) -> list[int]:
    """The rounds after which a run was cut off and resumed, this resume included (empty: never cut off)."""
    return [*resumed.resumed_after, resumed.round] if resumed else []


def early_stop(cfg: RunConfig) -> EarlyStop | None:
    """The run's early-stopping rule on its task's headline metric, or None."""
    patience = cfg.federation.early_stop_patience
    if patience is None:
        return None
    metric = TASK_METRICS[cfg.model.task][0][0]
    fed = cfg.federation
    return EarlyStop(metric, True, patience, fed.early_stop_min_delta, fed.early_stop_min_rounds)


def run_baselines(job: Job, results: list[RoundResult], console: Console | None) -> dict[str, dict[str, Any]]:
    """The centralized baselines the config asks for ("same_passes", "converged"); the global state is loaded
    back into the model afterwards."""
    cfg, baselines = job.cfg, {}
    status = console.status if console else (lambda _text: contextlib.nullcontext())
    if cfg.train.centralized or cfg.train.centralized_converged:
        job.load_pretrained()  # (each baseline loads the initial trainable tensors itself as well)
    if cfg.train.centralized:
        passes = sum(r.examples_seen for r in results)
        with status("training the centralized baseline (same example passes)"):
            baselines["same_passes"] = run_same_passes(job.model, job.initial, job.data, job.tokenizer, job.schedule,
                                                       passes, cfg.train.seed, job.evaluate_model)
    if cfg.train.centralized_converged:
        with status("training the centralized baseline to convergence"):
            baselines["converged"] = run_converged(cfg, job.model, job.initial, job.data, job.tokenizer, job.schedule,
                                                   job.evaluate_model)
    job.load_model()
    return baselines


def default_console() -> Console:
    """A console that does not squeeze tables into 80 columns when writing to a log."""
    console = Console()
    if not console.is_terminal:
        console.width = 150
    return console


def run(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the federated job in this process (embedded runtime; and the centralized baseline when asked); return
    the summary. :func:`fedcustom.launch.run` picks the runtime the config names."""
    start = time.perf_counter()
    if cfg.federation.runtime != "embedded":
        raise FedCustomError(f"--runtime {cfg.federation.runtime}: fedcustom.runner runs the embedded runtime; "
                             f"run Flower runtimes with fedcustom.launch.run (what `fedcustom run` calls)")
    return execute(build_job(cfg), console, start)


def resumed_config(out: Path, checkpoint: Checkpoint) -> RunConfig:
    """The config of the run whose checkpoint is in ``out``, writing to ``out`` (the folder may have moved since)."""
    values = checkpoint.config
    values["output"]["dir"] = str(out)
    return build_config(values)


def check_settings_unmoved(out: Path, checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """Refuse to resume a run whose config left training settings to the method's defaults when those defaults
    have moved since it started: its resumed rounds would train differently from its first ones."""
    moved = moved_settings(checkpoint.settings, cfg)
    if moved:
        changes = ", ".join(f"{key} {was} -> {now}" for key, (was, now) in moved.items())
        raise FedCustomError(f"--resume {out}: the run started with training settings its config leaves to the "
                             f"method's defaults, and these defaults have moved since ({changes}): the resumed "
                             "rounds would train differently from the first ones. Start it again (with these "
                             "settings in its config, a later default cannot move them)")


def resume(path: str, console: Console | None = None,
           runtime_for: Callable[[RunConfig], RuntimeFactory | None] = lambda _cfg: None) -> dict[str, Any]:
    """`fedcustom run --resume DIR`: rebuild the job from DIR's checkpoint and run the rounds still to do
    (``runtime_for(cfg)``: where its clients are, as for build_job; a deployment resumes on a Flower Grid)."""
    start = time.perf_counter()
    job, checkpoint = resumed_job(Path(path).expanduser(), runtime_for)
    return execute(job, console, start, checkpoint)


def resumed_job(out: Path, runtime_for: Callable[[RunConfig], RuntimeFactory | None] = lambda _cfg: None,
                checkpoint: Checkpoint | None = None) -> tuple[Job, Checkpoint]:
    """The interrupted run in ``out`` rebuilt and restored to its checkpoint (``checkpoint``: already loaded from
    ``out``), ready for :func:`execute` to run the rounds still to do."""
    checkpoint = checkpoint or load_checkpoint(out)
    cfg = resumed_config(out, checkpoint)
    runtime = runtime_for(cfg)
    if runtime is None and cfg.federation.runtime != "embedded":
        raise FedCustomError(f"--resume {out}: a --runtime {cfg.federation.runtime} run; `fedcustom run --resume` "
                             "continues embedded runs, and a SuperLink run continues with `fedcustom submit --resume`"
                             " (a flower-sim run's clients lived in the simulation and cannot be rebuilt: run it "
                             "again)")
    check_settings_unmoved(out, checkpoint, cfg)
    job = build_job(cfg, runtime)
    parts = job.checkpoint_parts()
    if set(parts) != set(checkpoint.parts):
        raise FedCustomError(f"--resume {out}: the checkpoint holds {sorted(checkpoint.parts)}, this job needs "
                             f"{sorted(parts)}")
    for name, part in parts.items():
        part.load_state_dict(*checkpoint.parts[name])
    torch.set_rng_state(checkpoint.rng_state)  # after build_job, which seeds model initialisation
    return job, checkpoint


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
    trackers = Trackers(cfg.output.trackers, job.out, cfg.to_dict(), cfg.output.tracker_uri)
    try:
        summary = _train_and_report(job, console, show, start, resumed, trackers)
    except BaseException:
        trackers.finish({}, [], failed=True)
        raise
    artifacts = [job.out / "summary.json", job.out / "report.md", *sorted(job.out.glob("report_*.png"))]
    trackers.finish(summary, [job.model_dir, *artifacts] if cfg.output.save_model else artifacts)
    return summary


def _train_and_report(job: Job, console: Console, show: bool, start: float, resumed: Checkpoint | None,
                      trackers: Trackers) -> dict[str, Any]:
    cfg = job.cfg
    results = run_rounds(job, console, show, resumed, trackers.log_round)
    job.load_model()
    saved_bytes = 0  # the end's save messages (--personalize: each client's own model, written where it runs)
    if cfg.output.save_model:
        save_global_model(job)
        saved_bytes = save_client_models(job)
    baselines = run_baselines(job, results, console if show else None)
    wall = time.perf_counter() - start + (resumed.wall_seconds if resumed else 0.0)
    summary = summarize(cfg, results, baselines, job.model, job.initial, job.data, wall,
                        resolved_settings(cfg, job.method, job.schedule), job.client_stats(), early_stop(cfg))
    # wall_seconds of a resumed run counts the time up to its checkpoint and after the resume; the part of the
    # round that was cut off is lost with its process, so the summary says where the run resumed
    summary["resumed_after_rounds"] = resumed_after(resumed)
    summary["bytes_save_total"] = saved_bytes
    summary["bytes_setup_total"] = setup_bytes(job)
    write_json(job.out / "summary.json", summary)
    (job.out / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing to resume (it was as large as the model)
    if cfg.output.report:
        from fedcustom.run_report import write_report  # matplotlib loads only here

        write_report(job.out)
    if show:
        console.print(rounds_table(results, baselines, cfg.model.task))
        console.print(f"wall time {summary['wall_seconds']:.1f} s; results in {job.out}")
    return summary
