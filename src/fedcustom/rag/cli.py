"""``fedcustom rag index | query | eval``: the command line of federated retrieval-augmented generation."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from fedcustom.errors import FedCustomError
from fedcustom.rag.encoder import DEFAULT_ENCODER
from fedcustom.rag.index import INDEX_KINDS
from fedcustom.rag.merge import MERGES


def add_rag_parser(sub: argparse._SubParsersAction) -> None:
    rag = sub.add_parser("rag", help="Federated retrieval-augmented generation: index, query, eval.",
                         description="Each client keeps its own documents and index; questions go to the clients, "
                                     "their top k come back and are merged, a causal LM answers with them.")
    verbs = rag.add_subparsers(dest="rag_command", required=True)
    index = verbs.add_parser("index", help="Build each client's local vector index.",
                             description="One index per --documents source (a folder of .txt/.md files, or a "
                                         "JSONL/JSON/CSV/TSV/Parquet file), saved as OUTPUT/client-<i>/; or one "
                                         "source split over --clients.")
    index.add_argument("--documents", action="append", required=True, metavar="PATH",
                       help="A client's documents (repeat: one per client)")
    index.add_argument("--output", required=True, metavar="DIR", help="Where client-<i>/ index folders go")
    index.add_argument("--clients", type=int, metavar="N", help="Split the one --documents source over N clients")
    index.add_argument("--group-column", metavar="NAME",
                       help="With --clients: keep rows with the same value of this column (e.g. topic) together")
    index.add_argument("--text-column", metavar="NAME", help="The text column of a table (default: text, document, "
                                                             "passage, content or answer)")
    _encoder_flags(index)
    index.add_argument("--index-kind", choices=INDEX_KINDS, default="flat",
                       help="flat: exact inner product; hnsw: approximate, faster on large stores (default: flat)")
    query = verbs.add_parser("query", help="Ask the clients' indexes a question and answer it.",
                             description="Embedded: --index DIR (client-<i>/ folders, one simulated client each) or "
                                         "repeated --index (one folder per client). --runtime flower-sim: the same "
                                         "on Flower's simulation engine. --superlink: a Flower run whose SuperNodes "
                                         "each name their own index (node config rag-index=DIR, optional rag-max-k=N).")
    query.add_argument("question", nargs="?", help="The question")
    query.add_argument("--interactive", action="store_true", help="Answer each stdin line until EOF or an empty line")
    query.add_argument("--index", action="append", metavar="DIR", help="Index folder(s) (embedded, flower-sim)")
    query.add_argument("--runtime", choices=("embedded", "flower-sim"), default="embedded",
                       help="Where the clients run without --superlink (default: embedded)")
    query.add_argument("--superlink", metavar="HOST:PORT", help="Submit to this Flower SuperLink")
    trust = query.add_mutually_exclusive_group()
    trust.add_argument("--insecure", action="store_true", help="With --superlink: plain HTTP")
    trust.add_argument("--root-certificates", metavar="PEM", help="With --superlink: the CA of its TLS certificate")
    query.add_argument("--clients", type=int, metavar="N",
                       help="SuperNodes to wait for (--superlink; flower-sim: default, the number of indexes)")
    query.add_argument("--round-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="Flower: how long to wait for the nodes' replies (default: 120)")
    query.add_argument("--output", default="runs/rag-query", metavar="DIR",
                       help="Flower: where the ServerApp writes answers.jsonl (default: runs/rag-query)")
    _retrieval_flags(query)
    _generator_flags(query)
    query.add_argument("--no-generate", action="store_true", help="Print the merged passages only")
    query.add_argument("--json", action="store_true", help="One JSON object per question instead of text")
    ev = verbs.add_parser("eval", help="Recall@k, answer quality and bytes per question, federated vs central.",
                          description="Documents of a question/answer set spread over --clients (whole topics per "
                                      "client); retrieval with every client, with --route, and from one central "
                                      "index; answers without retrieval, with federated and with central retrieval.")
    ev.add_argument("--dataset", default="chatterbot",
                    help="chatterbot (packaged) or a .jsonl/.json of question, answer, documents[, topic]")
    ev.add_argument("--clients", type=int, default=4, metavar="N", help="(default: 4)")
    ev.add_argument("--max-questions", type=int, default=100, metavar="N", help="Questions sampled (default: 100)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output", default="runs/rag-eval", metavar="DIR",
                    help="results.json and report.md (default: runs/rag-eval)")
    ev.add_argument("--index-kind", choices=INDEX_KINDS, default="flat")
    _encoder_flags(ev)
    _retrieval_flags(ev, route_default="topn:2")
    _generator_flags(ev, max_new_tokens=32)
    ev.add_argument("--no-generate", action="store_true", help="Retrieval numbers only")


def _encoder_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default=DEFAULT_ENCODER, metavar="NAME_OR_PATH",
                        help="Hugging Face encoder: alias, folder or Hub name (default: minilm, the packaged "
                             "all-MiniLM-L6-v2)")


def _retrieval_flags(parser: argparse.ArgumentParser, route_default: str = "all") -> None:
    if not any(a.dest == "encoder" for a in parser._actions):
        _encoder_flags(parser)
    parser.add_argument("--k", type=int, default=5, help="Passages kept after merging (each client returns k, at "
                                                         "most its rag-max-k, default 100; default: 5)")
    parser.add_argument("--route", default=route_default, metavar="all|topn:N",
                        help=f"Which clients a question goes to: all, or the N with the nearest index centroid "
                             f"(default: {route_default})")
    parser.add_argument("--merge", choices=MERGES, default="score",
                        help="score: exact inner product (equals a central index's top k); rrf: reciprocal rank "
                             "fusion summed over clients (default: score)")
    parser.add_argument("--two-phase", action="store_true",
                        help="Clients first return ids and scores only; the server asks for the texts it keeps")


def _generator_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 48) -> None:
    parser.add_argument("--generator", default="smollm2", metavar="NAME_OR_PATH",
                        help="Causal LM that answers (default: smollm2, the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", metavar="DIR", help="A PEFT adapter from `fedcustom run --task causal-lm`")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise FedCustomError(f"--{name.replace('_', '-')} {value}: expected a whole number >= 1")


def run_rag(args: argparse.Namespace) -> int:
    if args.rag_command == "index":
        return _index(args)
    if args.rag_command == "query":
        return _query(args)
    return _eval(args)


def _index(args: argparse.Namespace) -> int:
    from fedcustom.rag.encoder import Encoder
    from fedcustom.rag.stores import build_indexes

    if args.clients is not None:
        _check_positive(clients=args.clients)
    if args.group_column and args.clients is None:
        raise FedCustomError("--group-column splits one source over --clients N; give --clients")
    for folder in build_indexes(args.documents, args.output, Encoder(args.encoder), args.index_kind, args.clients,
                                args.text_column, args.group_column):
        meta = json.loads((folder / "index.json").read_text())
        print(f"{folder}: {meta['documents']} documents, {meta['kind']} index, encoder {meta['encoder']}")
    return 0


def _lines(stdin: TextIO) -> Iterator[str]:
    """Questions from stdin, as `fedcustom generate --interactive` reads prompts."""
    from fedcustom.generate_cli import prompt_lines

    return (line.strip() for line in prompt_lines(stdin))


def _query(args: argparse.Namespace) -> int:
    from fedcustom.rag.client import RagClient
    from fedcustom.rag.encoder import Encoder
    from fedcustom.rag.index import ClientIndex, index_folders
    from fedcustom.rag.route import Route
    from fedcustom.rag.server import FederatedRetriever
    from fedcustom.runtime.embedded import EmbeddedRuntime

    if not args.interactive and not (args.question or "").strip():
        raise FedCustomError("the question is empty: give one, or --interactive to read questions from stdin")
    _check_positive(k=args.k, max_new_tokens=args.max_new_tokens)
    route = Route.parse(args.route)
    if args.superlink or args.runtime == "flower-sim":
        return _query_on_flower(args)
    if not args.index:
        raise FedCustomError("--index: give the index folder(s) to query (or --superlink, whose nodes name theirs)")
    folders = [f for root in args.index for f in index_folders(root)]
    indexes = {i: ClientIndex.load(f) for i, f in enumerate(folders)}
    retriever = FederatedRetriever(EmbeddedRuntime(RagClient(indexes), len(indexes)), Encoder(args.encoder), args.k,
                                   args.merge, route, args.two_phase)
    retriever.describe()
    generator = None
    if not args.no_generate:
        from fedcustom.rag.answer import Generator

        generator = Generator(args.generator, args.adapter, args.max_new_tokens)
    questions = _lines(sys.stdin) if args.interactive else [args.question]
    for question in questions:
        result = retriever.retrieve([question])[0]
        answer = generator.answer([question], [[h.text or "" for h in result.hits]])[0] if generator else None
        _print_row(result.as_row(answer), args.json)
    return 0


def _print_row(row: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row), flush=True)
        return
    if row["answer"] is not None:
        print(row["answer"])
    for rank, hit in enumerate(row["passages"], 1):
        text = (hit["text"] or "").replace("\n", " ")
        print(f"  [{rank}] {hit['score']:.3f} client {','.join(map(str, hit['clients']))} {hit['id']}: {text[:100]}")
    print(f"  asked clients {row['clients']}; {row['bytes']:,.0f} bytes; {1000 * row['seconds']:.0f} ms", flush=True)


def _query_on_flower(args: argparse.Namespace) -> int:
    """The questions as one Flower run: simulated, or submitted to a SuperLink; prints the ServerApp's answers."""
    try:
        from fedcustom.deploy.flower.rag import RAG_KEY, RagJob, run_rag_simulation
    except ImportError as exc:
        raise FedCustomError(f"Flower runtimes need Flower: pip install 'fedcustom[flower]' ({exc})") from None
    from fedcustom.rag.index import index_folders

    questions = list(_lines(sys.stdin)) if args.interactive else [args.question]
    if args.superlink:
        if not (args.insecure or args.root_certificates):
            raise FedCustomError("--superlink: give --insecure (plain HTTP) or --root-certificates PEM")
        if args.clients is None:
            raise FedCustomError("--superlink: give --clients N, the number of SuperNodes to wait for")
        _check_positive(clients=args.clients)
        index = None
    else:
        if not args.index or len(args.index) != 1:
            raise FedCustomError("--runtime flower-sim: give one --index DIR holding client-<i>/ folders")
        clients = len(index_folders(args.index[0]))
        index = str(Path(args.index[0]).resolve())
    job = RagJob(questions, args.clients or clients, str(Path(args.output).resolve()), index, args.k, args.route,
                 args.merge, args.two_phase, args.encoder, None if args.no_generate else args.generator,
                 args.adapter, args.max_new_tokens, args.round_timeout)
    if args.superlink:
        from fedcustom.deploy.flower.submit import Connection, submit

        result = submit({RAG_KEY: job.to_json()}, Connection(args.superlink, args.root_certificates, args.insecure))
        answers = Path(job.output) / "answers.jsonl"
        if not answers.is_file():  # the SuperLink runs on another machine: its ServerApp wrote the answers there
            print(f"run {result['run_id']}: {result['status']}; the server wrote {answers} on its machine")
            return 0
        rows = [json.loads(line) for line in answers.read_text().splitlines()]
    else:
        rows = run_rag_simulation(job)
    for row in rows:
        _print_row(row, args.json)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fedcustom.rag.evaluate import EvalSettings, evaluate, headline, report_lines
    from fedcustom.rag.route import Route

    _check_positive(k=args.k, clients=args.clients, max_questions=args.max_questions,
                    max_new_tokens=args.max_new_tokens)
    Route.parse(args.route)
    settings = EvalSettings(args.dataset, args.clients, args.k, args.route, args.merge, args.encoder,
                            None if args.no_generate else args.generator, args.adapter, args.max_questions,
                            args.max_new_tokens, args.index_kind, args.seed, args.two_phase)
    started = time.perf_counter()
    result = evaluate(settings)
    result["command"] = getattr(args, "command_line", None)
    from fedcustom.bench.report import machine, machine_line

    result["machine"] = machine_line(machine())
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = report_lines(result)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(headline(result))
    return 0
