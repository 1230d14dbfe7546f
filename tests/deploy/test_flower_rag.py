"""Federated retrieval on Flower (issue 22): the question round trip through Flower's simulation engine and
through a real SuperLink whose SuperNodes each serve their own index, with the same passages as the embedded
runtime."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
pytest.importorskip("faiss", reason="retrieval needs faiss-cpu: pip install 'fedcustom[rag]'")

from conftest import FILLER, NEGATIVE, POSITIVE  # noqa: E402
from flower_cluster import Cluster  # noqa: E402
from fedcustom.cli import main  # noqa: E402

pytestmark = pytest.mark.integration

QUESTIONS = ["good great film", "awful boring plot"]


def _indexes(tmp_path: Path, tiny_bert: str) -> Path:
    rng = random.Random(3)
    rows = [{"text": " ".join(rng.choices(POSITIVE + NEGATIVE + FILLER, k=6)), "topic": f"t{i % 4}"} for i in range(40)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "index"
    assert main(["rag", "index", "--documents", str(corpus), "--clients", "2", "--group-column", "topic",
                 "--encoder", tiny_bert, "--output", str(out)]) == 0
    return out


def _query(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    capsys.readouterr()
    rows = []
    for question in QUESTIONS:
        assert main(["rag", "query", question, "--k", "3", "--no-generate", "--json", *args]) == 0
        rows += [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return rows


def _passages(rows: list[dict]) -> list[list[tuple[str, str]]]:
    return [[(p["id"], p["text"]) for p in row["passages"]] for row in rows]


def test_flower_simulation_retrieves_what_the_embedded_runtime_does(tmp_path: Path, tiny_bert: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    index = _indexes(tmp_path, tiny_bert)
    embedded = _query(capsys, "--index", str(index), "--encoder", tiny_bert)
    simulated = _query(capsys, "--index", str(index), "--encoder", tiny_bert, "--runtime", "flower-sim",
                       "--output", str(tmp_path / "sim"))
    assert _passages(simulated) == _passages(embedded)
    assert [r["clients"] for r in simulated] == [[0, 1], [0, 1]] and all(r["bytes"] > 0 for r in simulated)


def test_supernodes_serve_their_own_indexes_on_a_real_superlink(tmp_path: Path, tiny_bert: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    # Prepare: each SuperNode names its own index folder in its node config (no index on the submitting side)
    index = _indexes(tmp_path, tiny_bert)
    embedded = _query(capsys, "--index", str(index), "--encoder", tiny_bert)
    with Cluster(tmp_path) as cluster:
        cluster.start_superlink()
        cluster.start_worker_nodes({f"owner{i}": f"partition-id={i} rag-index='{index / f'client-{i}'}'"
                                    for i in range(2)})
        # Execute: one run per question, each submitted to the SuperLink
        deployed = _query(capsys, "--superlink", cluster.address, "--insecure", "--clients", "2", "--encoder",
                          tiny_bert, "--output", str(tmp_path / "deployed"), "--round-timeout", "60")
    # Assert: the ServerApp wrote the same passages the embedded runtime found
    assert _passages(deployed) == _passages(embedded)
    assert (tmp_path / "deployed" / "answers.jsonl").is_file()


def test_a_node_keeps_what_it_offered_across_processes_and_bounds_k_by_its_node_config(
        tmp_path: Path, tiny_bert: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a deployed SuperNode answers each message in a fresh process (the client cache is empty again);
    # only its context.state carries over
    from flwr.app import Context, Message as FlowerMessage, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedcustom.deploy.flower import rag
    from fedcustom.errors import FedCustomError
    from fedcustom.rag.encoder import Encoder
    from fedcustom.runtime import Message
    from fedcustom.runtime.flower.records import content_to_reply, message_to_content

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):  # a ServerApp stamps what it sends
        monkeypatch.setattr(TaskIdentity, name, value)
    index = _indexes(tmp_path, tiny_bert)
    job = rag.RagJob(QUESTIONS, clients=2, output=str(tmp_path / "out"), index=str(index))
    context = Context(run_id=7, node_id=3, node_config={"partition-id": 0, "rag-max-k": 2}, state=RecordDict(),
                      run_config={})
    vectors = Encoder(tiny_bert).encode(QUESTIONS)

    def send(kind: str, payload: bytes = b"", **config):  # type: ignore[no-untyped-def]
        rag._CLIENTS.clear()  # a fresh process
        message = FlowerMessage(message_to_content(Message(kind, 1, payload, config)), 3, f"train.{kind}")
        return content_to_reply(rag.handle_rag(message, context, job).content)

    # Execute / Assert: k above the node's rag-max-k is refused; a two-phase search's ids are fetched in the
    # next process, and only those
    assert "at most 2 passages" in send("rag_search", vectors.tobytes(), k=3, dim=vectors.shape[1]).error
    found = json.loads(send("rag_search", vectors.tobytes(), k=2, dim=vectors.shape[1], texts=False).payload)
    ids = sorted({row[0] for question in found for row in question})
    assert set(json.loads(send("rag_fetch", ids=json.dumps(ids)).payload)) == set(ids)
    assert "did not return in its last two-phase search" in send("rag_fetch", ids=json.dumps(ids + ["not-offered"])).error
    context.node_config["rag-max-k"] = "many"
    with pytest.raises(FedCustomError, match="rag-max-k='many'; expected a whole number >= 1"):
        send("rag_search", vectors.tobytes(), k=2, dim=vectors.shape[1])
