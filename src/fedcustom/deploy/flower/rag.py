"""Federated retrieval on a Flower Grid: the server's questions go to each SuperNode as messages, every node
searches its own index (node config ``rag-index=/path/to/its/index``; in simulation, or without it, the node takes
``client-<partition-id>`` of the job's ``index`` folder) and the ServerApp merges, answers and writes
``answers.jsonl`` to the job's output folder.

The job travels in Flower's run config as JSON (key ``fedcustom-rag``), as a training run's config does."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message as FlowerMessage

from fedcustom.errors import FedCustomError
from fedcustom.runtime.flower.records import content_to_message, reply_to_content

log = logging.getLogger(__name__)

RAG_KEY = "fedcustom-rag"  # run config: the RagJob as JSON
RAG_KINDS = ("rag_describe", "rag_search", "rag_fetch")  # fedcustom.rag.client.KINDS, without importing faiss


@dataclass(frozen=True)
class RagJob:
    questions: list[str]
    clients: int
    output: str
    index: str | None = None  # folder of client-<i>/ indexes, for nodes whose node config names none
    k: int = 5
    route: str = "all"
    merge: str = "score"
    two_phase: bool = False
    encoder: str = "minilm"
    generator: str | None = "smollm2"
    adapter: str | None = None
    max_new_tokens: int = 48
    round_timeout: float = 120.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RagJob:
        return cls(**json.loads(text))


def job_from_run_config(run_config: dict[str, Any]) -> RagJob | None:
    text = str(run_config.get(RAG_KEY) or "")
    return RagJob.from_json(text) if text else None


# ---------------------------------------------------------------------------------------------- server side
def answer_questions(job: RagJob, runtime: Any) -> list[dict[str, Any]]:
    """Retrieve through ``runtime`` (any Runtime), answer, write OUTPUT/answers.jsonl; returns the rows."""
    from fedcustom.rag.encoder import Encoder
    from fedcustom.rag.route import Route
    from fedcustom.rag.server import FederatedRetriever

    retriever = FederatedRetriever(runtime, Encoder(job.encoder), job.k, job.merge, Route.parse(job.route),
                                   job.two_phase)
    retriever.describe()
    results = retriever.retrieve(job.questions)
    answers: list[str | None] = [None] * len(results)
    if job.generator:
        from fedcustom.rag.answer import Generator

        generator = Generator(job.generator, job.adapter, job.max_new_tokens)
        answers = generator.answer(job.questions, [[h.text or "" for h in r.hits] for r in results])
    rows = [r.as_row(a) for r, a in zip(results, answers)]
    out = Path(job.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def run_rag_on_grid(grid: Any, job: RagJob) -> list[dict[str, Any]]:
    from fedcustom.runtime.flower.runtime import FlowerRuntime

    return answer_questions(job, FlowerRuntime(grid, job.clients, job.round_timeout))


# ---------------------------------------------------------------------------------------------- client side
_CLIENTS: dict[tuple[int, int], Any] = {}  # (run id, partition) -> RagClient: the index is loaded once per process
OFFERED_STATE = "fedcustom.rag-offered"  # node context state: the ids this node returned without texts (two-phase)


def max_k_of(context: Context) -> int:
    """The most passages per question this data owner answers: its node config's ``rag-max-k``, else 100."""
    from fedcustom.rag.client import DEFAULT_MAX_K

    value = context.node_config.get("rag-max-k", DEFAULT_MAX_K)
    try:
        max_k = int(value)
    except (TypeError, ValueError):
        max_k = 0
    if max_k < 1:
        raise FedCustomError(f"this SuperNode's node config has rag-max-k={value!r}; expected a whole number >= 1")
    return max_k


def _index_folder(context: Context, job: RagJob, partition: int) -> Path:
    own = context.node_config.get("rag-index")
    if own:
        return Path(str(own))
    if job.index is None:
        raise FedCustomError("this SuperNode's node config has no rag-index; start it with "
                             "--node-config \"partition-id=0 rag-index='/path/to/its/index'\"")
    return Path(job.index) / f"client-{partition}"


def handle_rag(message: FlowerMessage, context: Context, job: RagJob | None) -> FlowerMessage:
    """A retrieval message: answered by this node's RagClient from its own index."""
    from fedcustom.deploy.flower.node import partition_of
    from fedcustom.rag.client import RagClient
    from fedcustom.rag.index import ClientIndex

    job = job or job_from_run_config(context.run_config)
    if job is None:
        raise FedCustomError(f"a retrieval message in a run without {RAG_KEY!r} in its run config")
    partition = partition_of(context)
    key = (context.run_id, partition)
    if key not in _CLIENTS:
        _CLIENTS[key] = RagClient({partition: ClientIndex.load(_index_folder(context, job, partition))},
                                  max_k_of(context))
    client = _CLIENTS[key]
    if OFFERED_STATE in context.state:  # a deployed SuperNode starts a fresh process per message
        client.offered[partition] = set(json.loads(str(context.state[OFFERED_STATE]["ids"])))
    reply = client(partition, content_to_message(message.content))
    context.state[OFFERED_STATE] = ConfigRecord({"ids": json.dumps(sorted(client.offered[partition]))})
    return FlowerMessage(reply_to_content(reply), reply_to=message)


def run_rag_simulation(job: RagJob) -> list[dict[str, Any]]:
    """The job on Flower's simulation engine (each simulated node serves client-<partition-id> of job.index)."""
    from flwr.simulation import run_simulation

    from fedcustom.deploy.flower.apps import make_client_app, make_server_app
    from fedcustom.deploy.flower.sim import backend_config

    answers = Path(job.output).expanduser() / "answers.jsonl"
    answers.unlink(missing_ok=True)
    resources = backend_config("auto", 1.0)["client_resources"]  # the nodes' encoders run where torch finds a GPU
    run_simulation(server_app=make_server_app(rag=job), client_app=make_client_app(rag=job),
                   num_supernodes=job.clients, backend_config={"client_resources": resources})
    if not answers.is_file():
        raise FedCustomError(f"the Flower simulation ended without writing {answers}; see the log above")
    return [json.loads(line) for line in answers.read_text().splitlines()]
