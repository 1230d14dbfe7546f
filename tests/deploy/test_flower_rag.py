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
