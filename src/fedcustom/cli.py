"""The `fedcustom` console script. Flags are generated from the config dataclasses' metadata."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any

from fedcustom.config import SECTIONS, RunConfig, field_help, load_config
from fedcustom.errors import FedCustomError


def _flag_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if typing.get_origin(base) is tuple:
        return str  # comma-separated list, split in config
    return base


def _is_list(hint: Any) -> bool:
    return any(typing.get_origin(a) is tuple for a in typing.get_args(hint) or [hint]) or typing.get_origin(hint) is tuple


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field that declares one; defaults stay None so TOML values survive."""
    for section in SECTIONS:
        group = parser.add_argument_group(f"[{section}]")
        hints = typing.get_type_hints(SECTIONS[section])
        for fld, meta in field_help(section):
            if not meta.get("flag"):
                continue
            default = fld.default if fld.default is not dataclasses.MISSING else None
            # a None default means "chosen at run time", which the help text itself explains
            shown = "" if default is None else f" (default: {default})"
            help_text = f"{meta['help']}{shown}".replace("%", "%%")  # argparse formats help with %
            dest = f"{section}.{fld.name}"
            kind = _flag_type(hints[fld.name])
            if kind is bool:
                group.add_argument(meta["flag"], dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif _is_list(hints[fld.name]):  # repeatable, and each value may itself be comma-separated
                group.add_argument(meta["flag"], dest=dest, action="append", default=None, metavar=fld.name.upper(),
                                   help=help_text)
            else:
                group.add_argument(meta["flag"], dest=dest, type=kind, default=None, choices=meta.get("choices"),
                                   metavar=fld.name.upper(), help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Flags the user actually gave, as ``{section: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            if isinstance(value, list):  # a repeatable flag (argparse gives [] for a bare "--")
                value = ",".join(v if isinstance(v, str) else ",".join(map(str, v)) for v in value)
            out.setdefault(section, {})[key] = value
    return out


def package_version() -> str:
    """The installed distribution's version (what pip reports), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedcustom")
    except PackageNotFoundError:
        from fedcustom import __version__

        return __version__


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line naming the input (and where help is), exit 2, like every other user error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """A message that echoes user input, kept on one line (a value may contain newlines)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def add_superlink_flags(parser: argparse.ArgumentParser) -> None:
    """Where the SuperLink listens and how to trust it (submit, ping)."""
    parser.add_argument("--superlink", required=True, help="host:port of the SuperLink (default port 8000).")
    trust = parser.add_mutually_exclusive_group(required=True)
    trust.add_argument("--root-certificates", help="CA certificate (PEM) that signed the SuperLink's TLS certificate.")
    trust.add_argument("--insecure", action="store_true", help="Plain HTTP (a SuperLink started with --insecure).")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedcustom", description="Federated customization of large models.")
    parser.add_argument("--version", action="version", version=f"fedcustom {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Run one federated customization job.",
                         description="Run one federated job; flags override the TOML file given with --config.")
    run.add_argument("--config", help="TOML file with [model], [data], [method], [federation], [codec], [privacy], "
                                      "[adversary], [train], [generation], [output] tables.")
    run.add_argument("--resume", metavar="DIR", help="Continue the interrupted run in DIR from its last checkpoint "
                                                     "(with the config it was started with).")
    add_config_flags(run)
    submit = sub.add_parser("submit", help="Submit a run to a Flower SuperLink (see README: Deploy across machines).",
                            description="Run the job as a Flower ServerApp on a SuperLink, with one SuperNode per "
                                        "data owner; waits for it to finish unless --no-wait.")
    submit.add_argument("--config", help="TOML file, as for `fedcustom run`.")
    add_superlink_flags(submit)
    submit.add_argument("--no-wait", action="store_true", help="Return once the run is submitted.")
    submit.add_argument("--resume", metavar="DIR",
                        help="Continue the interrupted deployment whose output folder DIR (on the SuperLink's machine, "
                             "as the ServerApp wrote it) holds its last checkpoint, with the config it was started with.")
    add_config_flags(submit)
    pinger = sub.add_parser("ping", help="Time a no-op message to every SuperNode of a SuperLink.",
                            description="Submit a run that sends a no-op query to every SuperNode --messages times "
                                        "and times each round trip (SuperLink, SuperNode, its ClientApp process or "
                                        "fedcustom worker, and back): what a message costs apart from its work. "
                                        "The ServerApp writes ping.json to --output on the SuperLink's machine.")
    add_superlink_flags(pinger)
    pinger.add_argument("--clients", type=int, required=True, help="SuperNodes to wait for and ping.")
    pinger.add_argument("--messages", type=int, default=20, help="Round trips per node (default: 20).")
    pinger.add_argument("--output", default="runs/ping", help="Folder for ping.json (default: runs/ping).")
    bench = sub.add_parser("bench", help="Reproduce the paper's method comparison (report.md, plots, results.json).",
                           description="Run a benchmark preset: methods x data splits x seeds, each with its "
                                       "centralized baseline; finished runs with the same config are reused.")
    bench.add_argument("--preset", default="quick", metavar="PRESET",
                       help="A preset name or a sweep file (.toml; see fedcustom.bench.sweep). "
                            "converge: the four methods run to convergence (early stopping) on SST-2 and AG News "
                            "at three label skews against centralized training to convergence, server optimizer and "
                            "drift correction picked on a tuning seed (hours; --jobs 2, runs reused); "
                            "quick: smoke run (<5 min on 2 CPUs); paper: the full grid (<60 min); "
                            "tune: learning-rate selection on held-out SST-2 train rows; frameworks: FedLLM vs "
                            "KD-FedLLM vs Split-FedLLM, varying cut layer, public set size and clients; codecs: raw vs "
                            "GradualDiff-Fed vs compressed codec chains for full fine-tuning and LoRA; robust: "
                            "FedAvg vs median, trimmed mean, Multi-Krum and norm bounding with 0, 10 and 30 "
                            "percent sign-flip attackers, for prefix tuning and LoRA; leakage: membership inference "
                            "(loss threshold, reference model) against the global model and one client's upload, for "
                            "prefix, LoRA and full fine-tuning without and with client-level DP; generative: full, "
                            "LoRA, prompt, "
                            "prefix, split and KD instruction tuning of SmolLM2 on the packaged ChatterBot corpus, each with "
                            "its centralized baseline (perplexity, ROUGE-L, MB and client FLOPs per round); "
                            "vision: EfficientNet-Lite0 on Fashion-MNIST; personalize: personalization modes on "
                            "label-skewed clients. Every preset is a declarative sweep (fedcustom/bench/sweeps/NAME.toml: "
                            "a base config plus axes); copy one and pass its path to run your own. "
                            "(default: quick)")
    bench.add_argument("--data-dir", default="../shared/data",
                       help="Folder with sst2/ and ag_news/ (default: ../shared/data)")
    bench.add_argument("--output", default=None, help="Output folder (default: runs/bench-PRESET)")
    bench.add_argument("--stage", action="append", metavar="NAME",
                       help="Run only this stage's missing runs (repeatable; e.g. leakage: its stages are its "
                            "methods; a name no stage has, such as report: run nothing); other stages' finished runs "
                            "are reused and the report covers what exists.")
    bench.add_argument("--only", action="append", metavar="AXIS=LABEL[,LABEL]",
                       help="Run only the missing runs with one of these labels on this axis (repeatable, one axis "
                            "each; e.g. --only method=prefix --only setting=ag_news-iid,ag_news-dirichlet0.1: the "
                            "runs a long sweep needs first); the rest are reused where finished, and the report "
                            "covers what exists.")
    bench.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                       help="Replace the backbone of the preset's base config (a packaged alias or a Hugging Face "
                            "model folder; it must suit the preset's task).")
    bench.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="Runs at a time, in worker processes sharing the CPU threads (default: 1)")
    gen = sub.add_parser("generate", help="Answer prompts with a trained causal-LM adapter or model.",
                         description="Greedy answers from a generative run's PEFT adapter folder (backbone from "
                                     "--model or the adapter's config) or whole-model folder, as plain text.")
    gen.add_argument("--adapter", required=True, metavar="DIR",
                     help="PEFT adapter folder (adapter_config.json) or whole model folder (config.json).")
    gen.add_argument("--model", metavar="NAME_OR_PATH",
                     help="Backbone for an adapter: alias, path or Hub name (default: the adapter's base model).")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                     help="Most tokens per answer (default: 64)")
    gen.add_argument("--system", metavar="TEXT", help="System message before each prompt.")
    gen.add_argument("--device", default="auto", metavar="DEVICE",
                     help="auto (CUDA when present), cpu, cuda, cuda:N or mps (default: auto)")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="Send the prompt text as is (base models without a chat template).")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("prompt", nargs="?", help="The prompt to answer.")
    source.add_argument("--interactive", action="store_true",
                        help="Answer each stdin line until EOF or an empty line.")
    worker = sub.add_parser("worker", help="Run a SuperNode's ClientApp tasks in one persistent process.",
                            description="The SuperExec of a SuperNode started with --isolation process: runs each of "
                                        "its messages in this process, keeping the model, data and client state "
                                        "loaded between messages (no process and no model load per message).")
    worker.add_argument("--runtime-api", default="127.0.0.1:9094", metavar="HOST:PORT",
                        help="The SuperNode's Runtime API (flower-supernode --port; default: 127.0.0.1:9094)")
    worker.add_argument("--root-certificates", help="CA certificate of the Runtime API's TLS (default: plain HTTP "
                                                    "on the loopback)")
    worker.add_argument("--auth-secret-file", help="The SuperNode's --superexec-auth-secret-file")
    worker.add_argument("--run", type=int, metavar="RUN_ID", help="Serve only this run; others get an error reply "
                                                                   "(default: every run, one after another, keeping "
                                                                   "only the latest run's model loaded)")
    worker.add_argument("--poll", type=float, default=0.05, metavar="SECONDS",
                        help="How soon to ask the node for a task after one arrived or ended; the wait doubles while "
                             "none comes, up to --max-poll (default: 0.05)")
    worker.add_argument("--max-poll", type=float, default=0.5, metavar="SECONDS",
                        help="The longest wait between asks when idle (default: 0.5)")
    worker.add_argument("--threads", type=int, metavar="N",
                        help="Torch threads (default: torch's; several nodes on one machine share its cores)")
    worker.add_argument("--wake-socket", metavar="PATH",
                        help="The node's --wake-socket: the node wakes the worker for each message instead of the "
                             "worker polling for it (polling at --max-poll stays as the fallback)")
    node = sub.add_parser("supernode", help="flower-supernode that polls every --poll seconds (for the worker).",
                          description="Flower's SuperNode with its fixed waits (3 s between pulls from the SuperLink, "
                                      "0.5 s for a reply) shortened to --poll (backing off to --max-poll while "
                                      "idle); every other argument, before or after these, goes to "
                                      "flower-supernode unchanged (authentication, TLS, node config).")
    node.add_argument("--poll", type=float, default=0.05, metavar="SECONDS",
                      help="Wait between pulls from the SuperLink right after a message; it doubles while none "
                           "comes, up to --max-poll (default: 0.05)")
    node.add_argument("--max-poll", type=float, default=0.5, metavar="SECONDS",
                      help="The longest wait between pulls when idle (Flower's own: 3; default: 0.5)")
    node.add_argument("--wake-socket", metavar="PATH",
                      help="Listen on this Unix socket (created 0600) and wake the node's fedcustom worker for each "
                           "message; give the worker the same --wake-socket")
    node.add_argument("--worker-grace", type=float, default=5.0, metavar="SECONDS",
                      help="With --wake-socket and --isolation process: a message that waited this long with no "
                           "worker connected is answered with an error by the node, so the round goes on without it "
                           "instead of waiting out the server's --round-timeout (default: 5)")
    report = sub.add_parser("report", help="Write a finished run's report.md and plots into its folder.",
                            description="report.md and PNG plots (metric and loss per round against the centralized "
                                        "baselines, cumulative MB, each client's data) from DIR's summary.json and "
                                        "round_log.jsonl.")
    report.add_argument("run_dir", metavar="DIR", help="A run's output folder (--output of `fedcustom run`).")
    report.add_argument("--html", action="store_true", help="Also write report.html, one page with the plots inlined.")
    from fedcustom.rag.cli import add_rag_parser  # argparse only: no torch until a rag command runs

    add_rag_parser(sub)
    return parser


def check_preset(preset: str, jobs: int) -> None:
    """A clear error for an unknown preset or a bad --jobs before anything loads."""
    from fedcustom.bench.sweep import sweep_names

    known = sweep_names()
    if preset not in known and not preset.endswith(".toml"):
        raise FedCustomError(f"--preset {preset!r}: expected one of {', '.join(known)}, or a sweep file (.toml)")
    if jobs < 1:
        raise FedCustomError(f"--jobs {jobs}: expected a whole number >= 1")


def submit_run(cfg: RunConfig, args: argparse.Namespace) -> int:
    """`fedcustom submit`: the job as a ServerApp on a SuperLink."""
    try:
        from fedcustom.deploy.flower.submit import Connection, submit
    except ImportError as exc:
        raise FedCustomError(f"fedcustom submit needs Flower: pip install 'fedcustom[flower]' ({exc})") from None
    from fedcustom.assemble import check_runtime_support

    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, runtime="flower"))
    check_runtime_support(cfg)  # here, not after the SuperLink has started a ServerApp
    result = submit(cfg, Connection(args.superlink, args.root_certificates, args.insecure), wait=not args.no_wait)
    print(f"run {result['run_id']}: {result['status']}; the server writes its results to {cfg.output.dir} "
          f"(relative to the SuperLink's working directory)")
    return 0


def ping_nodes(args: argparse.Namespace) -> int:
    """`fedcustom ping`: per-message round trips through a SuperLink."""
    if args.clients < 1 or args.messages < 2:
        raise FedCustomError(f"--clients {args.clients} --messages {args.messages}: expected at least 1 client and "
                             f"2 messages (the first round trip pays start-up costs and is reported apart)")
    try:
        from fedcustom.deploy.flower.ping import PING_KEY, PingJob
        from fedcustom.deploy.flower.submit import Connection, submit
    except ImportError as exc:
        raise FedCustomError(f"fedcustom ping needs Flower: pip install 'fedcustom[flower]' ({exc})") from None
    import json
    from pathlib import Path

    job = PingJob(args.clients, args.messages, args.output)
    result = submit({PING_KEY: job.to_json()}, Connection(args.superlink, args.root_certificates, args.insecure))
    written = Path(args.output) / "ping.json"
    if written.is_file():  # the SuperLink runs on this machine
        summary = json.loads(written.read_text())["summary"]
        print(f"run {result['run_id']}: {summary['messages']} round trips, median {summary['median_s'] * 1000:.0f} ms, "
              f"p90 {summary['p90_s'] * 1000:.0f} ms (first round {summary['first_round_s'] * 1000:.0f} ms); "
              f"{written}")
    else:
        print(f"run {result['run_id']}: {result['status']}; the server wrote ping.json to {args.output} on the "
              f"SuperLink's machine")
    return 0


def resume_submit(args: argparse.Namespace) -> int:
    """`fedcustom submit --resume DIR`: the interrupted deployment continued as a new run on the SuperLink."""
    given = sorted(f"{s}.{k}" for s, table in overrides_from_args(args).items() for k in table)
    if args.config or given:
        raise FedCustomError(f"--resume {args.resume}: a resumed run keeps the config it was started with; drop "
                             f"{'--config' if args.config else ', '.join(given)}")
    try:
        from fedcustom.deploy.flower.submit import Connection, resume_run_config, submit
    except ImportError as exc:
        raise FedCustomError(f"fedcustom submit needs Flower: pip install 'fedcustom[flower]' ({exc})") from None
    cfg, run_config = resume_run_config(args.resume)
    result = submit(run_config, Connection(args.superlink, args.root_certificates, args.insecure),
                    wait=not args.no_wait)
    print(f"run {result['run_id']}: {result['status']}; resumed {cfg.output.dir}")
    return 0


def resume_run(args: argparse.Namespace) -> int:
    """`fedcustom run --resume DIR`: the run's own config, no other flags."""
    given = sorted(f"{s}.{k}" for s, table in overrides_from_args(args).items() for k in table)
    if args.config or given:
        raise FedCustomError(f"--resume {args.resume}: a resumed run keeps the config it was started with; drop "
                             f"{'--config' if args.config else ', '.join(given)}")
    from fedcustom.runner import resume

    resume(args.resume)
    return 0


def generate_text(args: argparse.Namespace) -> int:
    """`fedcustom generate`: the logic lives in fedcustom.generate_cli."""
    from fedcustom.generate_cli import GenerateOptions, run_generate

    return run_generate(GenerateOptions(args.adapter, args.model, args.max_new_tokens, args.system,
                                        args.no_chat_template, args.prompt, args.interactive, args.device))


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "supernode":  # the supernode command hands flower-supernode its own arguments
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "generate":
            return generate_text(args)
        if args.command == "rag":
            from fedcustom.rag.cli import run_rag

            args.command_line = "fedcustom " + " ".join(sys.argv[1:] if argv is None else argv)
            return run_rag(args)
        if args.command == "supernode":
            from fedcustom.deploy.flower.worker import run_supernode

            run_supernode(unknown, args.poll, args.max_poll, args.wake_socket,  # Flower's, in order
                          args.worker_grace)
            return 0
        if args.command == "worker":
            from fedcustom.deploy.flower.worker import WorkerSettings, serve

            serve(WorkerSettings(runtime_api=args.runtime_api, insecure=args.root_certificates is None,
                                 root_certificates=args.root_certificates, auth_secret_file=args.auth_secret_file,
                                 run_id=args.run, poll_seconds=args.poll, max_poll_seconds=args.max_poll,
                                 threads=args.threads, wake_socket=args.wake_socket))
            return 0
        if args.command == "report":
            from pathlib import Path

            from fedcustom.run_report import write_report

            for path in write_report(Path(args.run_dir), args.html):
                print(path)
            return 0
        if args.command == "bench":
            from fedcustom.bench import run_bench

            command = "fedcustom " + " ".join(sys.argv[1:] if argv is None else argv)
            check_preset(args.preset, args.jobs)
            name = os.path.splitext(os.path.basename(args.preset))[0]
            run_bench(args.preset, args.data_dir, args.output or f"runs/bench-{name}", command, stages=args.stage,
                      jobs=args.jobs, model=args.model, only=args.only)
            return 0
        if args.command == "ping":
            return ping_nodes(args)
        if getattr(args, "resume", None) and args.command == "submit":
            return resume_submit(args)
        if getattr(args, "resume", None):
            return resume_run(args)
        cfg = load_config(args.config, overrides_from_args(args))
        if args.command == "submit":
            return submit_run(cfg, args)
        from fedcustom.launch import run

        run(cfg)
    except FedCustomError as exc:
        print(f"fedcustom: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
