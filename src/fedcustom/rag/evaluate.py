"""``fedcustom rag eval``: a question/answer set whose supporting documents are spread over the clients.

For each question: is a supporting document in the merged top k (recall@k), federated with every client, with
the chosen route, and from one central index over all documents (the upper bound); bytes and time per question;
then answers (exact match, ROUGE-L against the reference) without retrieval, with federated retrieval and with
the central index.

Sources: ``chatterbot`` (the packaged ChatterBot corpus: each answer is a document, each topic file goes whole to
one client, the question is the user turn before it) or a JSONL/JSON file with ``question``, ``answer`` and
``documents`` (a list of texts, or one text) and optionally ``topic`` (documents are split by topic, else round
robin over rows)."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedcustom.errors import FedCustomError
from fedcustom.rag.client import RagClient
from fedcustom.rag.documents import document_id, make_documents
from fedcustom.rag.encoder import Encoder
from fedcustom.rag.index import ClientIndex
from fedcustom.rag.route import Route
from fedcustom.rag.server import FederatedRetriever, Retrieval
from fedcustom.rag.stores import index_stores, split_groups
from fedcustom.runtime.embedded import EmbeddedRuntime


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    documents: tuple[str, ...]
    topic: str = ""


@dataclass
class EvalSettings:
    dataset: str = "chatterbot"
    clients: int = 4
    k: int = 5
    route: str = "topn:2"
    merge: str = "score"
    encoder: str = "minilm"
    generator: str | None = "smollm2"  # None: retrieval only
    adapter: str | None = None
    max_questions: int = 100
    max_new_tokens: int = 32
    index_kind: str = "flat"
    seed: int = 0
    two_phase: bool = False


def _chatterbot() -> list[QA]:
    from fedcustom.data.instructions import load_instructions

    data = load_instructions("chatterbot")
    return [QA(row["messages"][-1]["content"], row["response"], (row["response"],), row["topic"]) for row in data]


def _file(path: Path) -> list[QA]:
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
            if path.suffix == ".jsonl" else json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedCustomError(f"--dataset {path}: not valid JSON ({exc})") from None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"question", "answer", "documents"} <= row.keys():
            raise FedCustomError(f"--dataset {path}: row {i} needs question, answer and documents")
        docs = row["documents"] if isinstance(row["documents"], list) else [row["documents"]]
        out.append(QA(str(row["question"]), str(row["answer"]), tuple(str(d) for d in docs), str(row.get("topic", ""))))
    return out


def load_qa(dataset: str) -> list[QA]:
    if dataset == "chatterbot":
        return _chatterbot()
    path = Path(dataset).expanduser()
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        raise FedCustomError(f"--dataset {dataset!r}: expected chatterbot or a .jsonl/.json file of question, "
                             f"answer, documents")
    rows = _file(path)
    if not rows:
        raise FedCustomError(f"--dataset {dataset}: no rows")
    return rows


def client_stores(rows: list[QA], clients: int) -> list[list[str]]:
    """Each client's document texts: whole topics per client (balanced by distinct documents) when every row has a
    topic, else distinct documents round robin. A document is held where it first occurs."""
    first_topic: dict[str, str] = {}
    for row in rows:
        for doc in row.documents:
            first_topic.setdefault(doc.strip(), row.topic)
    texts = [t for t in first_topic if t]
    if all(first_topic[t] for t in texts):
        owners = split_groups([first_topic[t] for t in texts], clients)
    else:
        owners = [i % clients for i in range(len(texts))]
    return [[t for t, o in zip(texts, owners) if o == c] for c in range(clients)]


def recall(retrievals: list[Retrieval], rows: list[QA]) -> float:
    """Share of questions with at least one supporting document among the retrieved."""
    found = [bool({h.id for h in r.hits} & {document_id(d.strip()) for d in row.documents})
             for r, row in zip(retrievals, rows)]
    return sum(found) / len(found)


@dataclass
class Condition:
    name: str
    recall_at_k: float
    bytes_per_question: float
    seconds_per_question: float
    clients_per_question: float
    answers: dict[str, float] = field(default_factory=dict)


def _condition(name: str, retrievals: list[Retrieval], rows: list[QA]) -> Condition:
    return Condition(name, recall(retrievals, rows),
                     statistics.fmean(r.bytes_down + r.bytes_up for r in retrievals),
                     statistics.fmean(r.seconds for r in retrievals),
                     statistics.fmean(len(r.clients) for r in retrievals))


def evaluate(settings: EvalSettings) -> dict:
    """Every condition's numbers, as written to results.json."""
    from fedcustom.text_metrics import exact_match, rouge_l

    rows = load_qa(settings.dataset)
    stores = [make_documents(texts) for texts in client_stores(rows, settings.clients)]
    encoder = Encoder(settings.encoder)
    indexes = index_stores(stores, encoder, settings.index_kind)
    central = index_stores([make_documents([d for texts in client_stores(rows, 1) for d in texts])], encoder,
                           settings.index_kind)[0]
    questions = random.Random(settings.seed).sample(rows, min(settings.max_questions, len(rows)))
    texts = [q.question for q in questions]

    def run(route: Route, over: list[ClientIndex]) -> list[Retrieval]:
        runtime = EmbeddedRuntime(RagClient(dict(enumerate(over))), len(over))
        return FederatedRetriever(runtime, encoder, settings.k, settings.merge, route,
                                  settings.two_phase).retrieve(texts)

    results = {"all": run(Route(), indexes), "central": run(Route(), [central])}
    route = Route.parse(settings.route)
    if route.top is not None:
        results[str(route)] = run(route, indexes)
    conditions = {name: _condition(name, r, questions) for name, r in results.items()}
    if settings.generator:
        from fedcustom.rag.answer import Generator

        generator = Generator(settings.generator, settings.adapter, settings.max_new_tokens)
        references = [q.answer for q in questions]
        answered = {"none": generator.answer(texts, [[] for _ in texts])}
        for name, retrievals in results.items():
            answered[name] = generator.answer(texts, [[h.text or "" for h in r.hits] for r in retrievals])
        for name, predictions in answered.items():
            scores = {"exact_match": exact_match(predictions, references), "rouge_l": rouge_l(predictions, references)}
            if name in conditions:
                conditions[name].answers = scores
            else:
                conditions[name] = Condition(name, 0.0, 0.0, 0.0, 0.0, scores)
        samples = [{"question": t, "reference": q.answer, **{n: a[i] for n, a in answered.items()}}
                   for i, (t, q) in enumerate(zip(texts, questions)) if i < 10]
    else:
        samples = []
    return {"settings": asdict(settings), "questions": len(questions),
            "documents_per_client": [len(s) for s in stores], "central_documents": len(central.documents),
            "conditions": {n: asdict(c) for n, c in conditions.items()}, "samples": samples}


def report_lines(result: dict) -> list[str]:
    """The results as a Markdown table, headline last."""
    s = result["settings"]
    lines = [f"# Federated RAG evaluation: {s['dataset']}, {s['clients']} clients, k={s['k']}, merge={s['merge']}",
             "", f"{result['questions']} questions; documents per client {result['documents_per_client']} "
                 f"(central index: {result['central_documents']}); encoder {s['encoder']}, generator "
                 f"{s['generator'] or '(none)'}", ""]
    if result.get("command"):
        wall = result.get("wall_seconds")
        lines += [f"Command: `{result['command']}`  ", f"Machine: {result.get('machine')}"
                  + (f"; {wall:.0f} s in all (encoding, indexing, retrieval, generation)" if wall else ""), ""]
    lines += [
             "| retrieval | recall@k | bytes/question | ms/question | clients asked | exact match | ROUGE-L |",
             "|---|---|---|---|---|---|---|"]
    for name, c in result["conditions"].items():
        answers = c["answers"]
        answer_cells = [f"{answers['exact_match']:.3f}", f"{answers['rouge_l']:.3f}"] if answers else ["-", "-"]
        if name == "none":  # the generator alone
            retrieval_cells = ["-"] * 4
        else:
            retrieval_cells = [f"{c['recall_at_k']:.3f}", f"{c['bytes_per_question']:,.0f}",
                               f"{1000 * c['seconds_per_question']:.1f}", f"{c['clients_per_question']:.2f}"]
        lines.append("| " + " | ".join([name, *retrieval_cells, *answer_cells]) + " |")
    lines += ["", "## Targets (issue 22)", ""] + target_lines(result["conditions"])
    return lines


def target_lines(c: dict) -> list[str]:
    """Routing within 2 recall points of all clients at <= 50% of the bytes; answers with retrieval beat without."""
    met = lambda ok: "met" if ok else "missed"  # noqa: E731
    lines = []
    for name in [n for n in c if n.startswith("topn")]:
        drop = 100 * (c["all"]["recall_at_k"] - c[name]["recall_at_k"])
        share = 100 * c[name]["bytes_per_question"] / max(c["all"]["bytes_per_question"], 1.0)
        lines.append(f"- {name}: recall within 2 points of all clients ({drop:+.1f} points lost): {met(drop <= 2)}; "
                     f"at <= 50% of the bytes ({share:.1f}%): {met(share <= 50)}")
    if c["all"]["answers"] and "none" in c:
        with_, without = c["all"]["answers"]["rouge_l"], c["none"]["answers"]["rouge_l"]
        lines.append(f"- answers with retrieval beat answers without (ROUGE-L {with_:.3f} vs {without:.3f}): "
                     f"{met(with_ > without)}")
    return lines


def headline(result: dict) -> str:
    c = result["conditions"]
    parts = [f"recall@{result['settings']['k']}: federated {c['all']['recall_at_k']:.3f}, central "
             f"{c['central']['recall_at_k']:.3f}"]
    routed = [n for n in c if n.startswith("topn")]
    for name in routed:
        share = c[name]["bytes_per_question"] / max(c["all"]["bytes_per_question"], 1.0)
        parts.append(f"{name} {c[name]['recall_at_k']:.3f} at {100 * share:.0f}% of the bytes")
    if c["all"]["answers"]:
        parts.append(f"ROUGE-L with retrieval {c['all']['answers']['rouge_l']:.3f} vs without "
                     f"{c['none']['answers']['rouge_l']:.3f}")
    return "; ".join(parts)
