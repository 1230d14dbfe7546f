"""Federated retrieval (issue 22) on a tiny random encoder: the federated top k equals one central index's, merges
deduplicate and fuse ranks, routing and two-phase retrieval cut what is sent, indexes persist, bad input is a
one-line error."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="retrieval needs faiss-cpu: pip install 'fedcustom[rag]'")

from conftest import FILLER, NEGATIVE, POSITIVE  # noqa: E402
from fedcustom.cli import main  # noqa: E402
from fedcustom.rag.client import RagClient  # noqa: E402
from fedcustom.rag.documents import Document, document_id, load_documents, make_documents  # noqa: E402
from fedcustom.rag.encoder import Encoder  # noqa: E402
from fedcustom.rag.index import ClientIndex  # noqa: E402
from fedcustom.rag.merge import Hit, merge  # noqa: E402
from fedcustom.rag.route import Route  # noqa: E402
from fedcustom.rag.server import FederatedRetriever  # noqa: E402
from fedcustom.rag.stores import index_stores, split_groups  # noqa: E402
from fedcustom.runtime.embedded import EmbeddedRuntime  # noqa: E402

WORDS = POSITIVE + NEGATIVE + FILLER


def texts(n: int, seed: int, length: int = 6, words: list[str] = WORDS) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=length)) for _ in range(n)]


@pytest.fixture(scope="module")
def encoder(tiny_bert: str) -> Encoder:
    return Encoder(tiny_bert)


@pytest.fixture(scope="module")
def stores() -> list[list[Document]]:
    return [make_documents(texts(40, seed)) for seed in range(3)]


def retriever(indexes: list[ClientIndex], encoder: Encoder, **options) -> FederatedRetriever:
    return FederatedRetriever(EmbeddedRuntime(RagClient(dict(enumerate(indexes))), len(indexes)), encoder, **options)


def test_federated_top_k_is_the_central_indexs_top_k(encoder: Encoder, stores: list[list[Document]]) -> None:
    # Prepare: three clients' indexes and one central index over all their documents
    indexes = index_stores(stores, encoder)
    central = index_stores([make_documents([d.text for s in stores for d in s])], encoder)[0]
    questions = texts(12, seed=99, length=4)
    # Execute
    federated = retriever(indexes, encoder, k=5).retrieve(questions)
    reference = central.search(encoder.encode(questions), 5)
    # Assert: the same documents in the same order, with the same scores
    for got, want in zip(federated, reference, strict=True):
        assert [h.id for h in got.hits] == [doc.id for doc, _ in want]
        assert [h.score for h in got.hits] == pytest.approx([s for _, s in want], abs=1e-5)
        assert all(h.text for h in got.hits) and got.clients == [0, 1, 2]


def test_merges_deduplicate_by_hash_and_rrf_sums_over_clients() -> None:
    # Prepare: "shared" is returned by two clients at rank 2; "a1" and "b1" by one client each at rank 1
    lists = {0: [Hit("a1", 0.9, 1, "A"), Hit("shared", 0.8, 2, "S")],
             1: [Hit("b1", 0.7, 1, "B"), Hit("shared", 0.8, 2, "S")]}
    # Execute
    by_score = merge(lists, 3, "score")
    fused = merge(lists, 3, "rrf")
    # Assert: one entry per document; score keeps the inner product order; rrf puts the doubly returned one first
    assert [m.id for m in by_score] == ["a1", "shared", "b1"]
    assert [m.id for m in fused] == ["shared", "a1", "b1"]
    assert fused[0].score == pytest.approx(2 / 62) and fused[1].score == pytest.approx(1 / 61)
    assert fused[0].clients == (0, 1) and fused[0].text == "S"


def test_a_document_held_by_two_clients_is_retrieved_once(encoder: Encoder) -> None:
    shared = "good great film story"
    indexes = index_stores([make_documents([shared, *texts(5, 1)]), make_documents([shared, *texts(5, 2)])], encoder)
    hits = retriever(indexes, encoder, k=4).retrieve([shared])[0].hits
    assert [h.id for h in hits].count(document_id(shared)) == 1
    assert hits[0].id == document_id(shared) and hits[0].clients == (0, 1)


def test_routing_sends_a_question_only_to_the_nearest_clients(encoder: Encoder, stores: list[list[Document]]) -> None:
    # Prepare: clients with words of their own (one subject each); new questions in client 2's words
    stores = [make_documents(texts(30, seed, words=words)) for seed, words in enumerate([POSITIVE, NEGATIVE, FILLER])]
    indexes = index_stores(stores, encoder)
    questions = texts(6, seed=77, words=FILLER)
    # Execute
    everyone = retriever(indexes, encoder, k=3).retrieve(questions)
    routed = retriever(indexes, encoder, k=3, route=Route.parse("topn:1")).retrieve(questions)
    # Assert: one client asked per question, the one on that subject (centroids average 5 or more documents each,
    # so a question is routed by subject, not by a document it copies), and its answer is that client's best
    assert all(r.clients == [2] for r in routed)
    own_best = [row[0][0].id for row in indexes[2].search(encoder.encode(questions), 1)]
    assert [r.hits[0].id for r in routed] == own_best
    assert sum(r.bytes_down + r.bytes_up for r in routed) < 0.5 * sum(r.bytes_down + r.bytes_up for r in everyone)


@pytest.mark.parametrize("count", [1, 3, 9, 12, 16, 40])
def test_no_routing_centroid_is_the_mean_of_fewer_than_5_documents(count: int) -> None:
    # Prepare: random unit vectors (k-means alone left 7 of 8 centroids equal to one document at 9 documents)
    from fedcustom.rag.index import routing_centroids

    vectors = np.random.default_rng(count).standard_normal((count, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Execute
    centroids = routing_centroids(vectors)
    # Assert: unit vectors, at most 8 and at most count // 5; each the mean of the >= 5 documents nearest it
    # (or of all, when fewer), so none is one document's embedding
    assert 1 <= len(centroids) <= max(1, min(8, count // 5))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    members = np.bincount(np.argmax(vectors @ centroids.T, axis=1), minlength=len(centroids))
    assert members.min() >= min(5, count)
    assert count == 1 or (vectors @ centroids.T).max() < 0.999


def test_centroids_are_shared_only_for_routing(encoder: Encoder, stores: list[list[Document]]) -> None:
    # Prepare
    indexes = index_stores(stores, encoder)
    # Execute
    everyone, routed = retriever(indexes, encoder), retriever(indexes, encoder, route=Route.parse("topn:1"))
    everyone.describe()
    routed.describe()
    # Assert: --route all asks for none (the server has no use for them); topn gets each client's
    assert all(c.size == 0 for c in everyone.centroids.values())
    assert all(len(c) == len(i.centroids) > 0 for c, i in zip(routed.centroids.values(), indexes))


def test_an_index_of_an_older_version_shares_no_centroid_and_is_always_asked(
        tmp_path: Path, encoder: Encoder, stores: list[list[Document]]) -> None:
    # Prepare: client 1's index as an older fedcustom wrote it (centroids of unknown membership)
    folders = [index.save(tmp_path / f"client-{i}") for i, index in enumerate(index_stores(stores, encoder))]
    meta = json.loads((folders[1] / "index.json").read_text())
    del meta["centroid_members"]
    (folders[1] / "index.json").write_text(json.dumps(meta))
    indexes = [ClientIndex.load(folder) for folder in folders]
    # Execute
    routed = retriever(indexes, encoder, k=3, route=Route.parse("topn:1")).retrieve([stores[0][0].text])
    # Assert
    assert indexes[1].centroids.size == 0 and indexes[0].centroids.size > 0
    assert 1 in routed[0].clients and len(routed[0].clients) == 2


def test_two_phase_retrieval_returns_the_same_passages_and_uploads_only_kept_texts(encoder: Encoder) -> None:
    long_docs = [make_documents([t + " " + " ".join(["story"] * 40) for t in texts(20, seed)]) for seed in range(2)]
    indexes = index_stores(long_docs, encoder)
    questions = texts(4, seed=7, length=4)
    one = retriever(indexes, encoder, k=2).retrieve(questions)
    two = retriever(indexes, encoder, k=2, two_phase=True).retrieve(questions)
    assert [[(h.id, h.text) for h in r.hits] for r in two] == [[(h.id, h.text) for h in r.hits] for r in one]
    assert sum(r.bytes_up for r in two) < sum(r.bytes_up for r in one)


def test_a_data_owner_bounds_k_and_serves_only_texts_it_offered(encoder: Encoder,
                                                                 stores: list[list[Document]]) -> None:
    # Prepare: one owner that answers at most 3 passages per question
    from fedcustom.errors import FedCustomError
    from fedcustom.runtime import Message

    index = index_stores(stores[:1], encoder)[0]
    owner = RagClient({0: index}, max_k=3)
    vectors = encoder.encode(["good great film"])

    def search(k: int, texts: bool):  # type: ignore[no-untyped-def]
        return owner(0, Message("rag_search", 1, vectors.tobytes(), {"k": k, "dim": vectors.shape[1],
                                                                     "texts": texts}))

    def fetch(ids: list[str]):  # type: ignore[no-untyped-def]
        return owner(0, Message("rag_fetch", 1, b"", {"ids": json.dumps(ids)}))

    # Execute / Assert: a query for more passages than the owner answers is refused by name, not cut short
    assert "k=4: this data owner answers at most 3 passages per question" in search(4, True).error
    # a fetch names only ids the owner returned without texts: none yet, so even a real id is refused
    some_id = index.documents[0].id
    assert "did not return in its last two-phase search" in fetch([some_id]).error
    offered = [row[0] for row in json.loads(search(3, False).payload)[0]]
    others = [d.id for d in index.documents if d.id not in offered][:1]
    assert "texts of 1 passages" in fetch(offered + others).error  # nothing of it served
    assert set(json.loads(fetch(offered).payload)) == set(offered)
    assert "texts of 3 passages" in fetch(offered).error  # each text once
    # the server checks the owners' bound before it searches: a larger --k is an error, not empty retrievals
    with pytest.raises(FedCustomError, match="--k 4: client 0 answers at most 3 passages per question"):
        FederatedRetriever(EmbeddedRuntime(owner, 1), encoder, k=4).retrieve(["good great film"])


def test_an_index_answers_its_encoder_under_any_of_its_names(tiny_bert: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an index made with the packaged MiniLM's alias, and one made with a local folder's relative path
    from fedcustom.models import resolve_model
    from fedcustom.runtime import Message

    vectors = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    docs = make_documents(texts(6, seed=1))
    monkeypatch.chdir(Path(tiny_bert).parent)
    owner = RagClient({0: ClientIndex.build(docs, vectors, "minilm"),
                       1: ClientIndex.build(docs, vectors, Path(tiny_bert).name),
                       2: ClientIndex.build(docs, vectors, str(Path.cwd()))})

    def describe(node: int, encoder: str) -> str | None:
        return owner(node, Message("rag_describe", 1, b"", {"encoder": encoder, "centroids": False})).error

    # Execute / Assert: the alias, its Hub id and its packaged folder are one encoder; a folder by any path too
    assert describe(0, "minilm") is None and describe(0, "sentence-transformers/all-MiniLM-L6-v2") is None
    assert describe(0, resolve_model("minilm")) is None
    assert describe(1, tiny_bert) is None and describe(1, f"./{Path(tiny_bert).name}") is None
    # ... and another encoder is still refused
    assert "encoder mismatch" in describe(0, tiny_bert) and "encoder mismatch" in describe(1, "minilm")
    assert "encoder mismatch" in describe(2, "")  # no name is no encoder (not the working directory's)


def test_routes_parse_and_bad_ones_are_named() -> None:
    assert Route.parse("all").top is None and Route.parse("topn:2").top == 2
    for bad in ("topn:0", "top:2", "topn:x", ""):
        with pytest.raises(Exception, match="--route"):
            Route.parse(bad)


def test_groups_are_split_whole_and_balanced() -> None:
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2
    owners = split_groups(groups, 2)
    assert {g: {o for gg, o in zip(groups, owners) if gg == g} for g in "abcd"} == {"a": {0}, "b": {1}, "c": {1}, "d": {0}}


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_index_saved_and_loaded_answers_the_same(tmp_path: Path, encoder: Encoder, stores: list[list[Document]],
                                                    kind: str) -> None:
    index = index_stores(stores[:1], encoder, kind)[0]
    loaded = ClientIndex.load(index.save(tmp_path / "client-0"))
    question = encoder.encode(["good film"])
    assert [d.id for d, _ in loaded.search(question, 5)[0]] == [d.id for d, _ in index.search(question, 5)[0]]
    assert loaded.encoder == encoder.name and loaded.kind == kind
    np.testing.assert_array_equal(loaded.centroids, index.centroids)


def test_documents_from_a_folder_and_a_table_are_hashed_and_deduplicated(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("the same text\n")
    (folder / "b.md").write_text("the same text")
    (folder / "c.txt").write_text("another one")
    (folder / "ignored.bin").write_text("not a document")
    table = tmp_path / "docs.jsonl"
    table.write_text("\n".join(json.dumps({"passage": t}) for t in ["x y", "x y", "z"]) + "\n")
    assert [d.text for d in load_documents(folder)] == ["the same text", "another one"]
    assert [d.id for d in load_documents(table)] == [document_id("x y"), document_id("z")]


# ----------------------------------------------------------------------------------------------- command line
def _corpus(tmp_path: Path) -> Path:
    rows = [{"text": t, "topic": f"t{i % 4}"} for i, t in enumerate(texts(24, 5))]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_index_then_query_from_the_command_line(tmp_path: Path, tiny_bert: str, tiny_llama: str,
                                                capsys: pytest.CaptureFixture) -> None:
    # Prepare: one corpus split over 2 clients by topic
    corpus, out = _corpus(tmp_path), tmp_path / "index"
    assert main(["rag", "index", "--documents", str(corpus), "--clients", "2", "--group-column", "topic",
                 "--encoder", tiny_bert, "--output", str(out)]) == 0
    capsys.readouterr()
    question = json.loads(corpus.read_text().splitlines()[3])["text"]
    # Execute: retrieval only (JSON), then with the tiny generator
    assert main(["rag", "query", question, "--index", str(out), "--encoder", tiny_bert, "--k", "2",
                 "--no-generate", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert main(["rag", "query", question, "--index", str(out), "--encoder", tiny_bert, "--k", "1",
                 "--generator", tiny_llama, "--max-new-tokens", "3"]) == 0
    answered = capsys.readouterr().out.splitlines()
    # Assert: both clients have an index; the question's own document comes first; an answer line, then sources
    assert sorted(p.name for p in out.iterdir()) == ["client-0", "client-1"]
    assert printed["passages"][0]["text"] == question and printed["clients"] == [0, 1] and printed["bytes"] > 0
    assert len(answered) == 3 and answered[1].startswith("  [1]") and question in answered[1]


def test_eval_writes_results_and_prints_its_headline_last(tmp_path: Path, tiny_bert: str, tiny_llama: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    rows = [{"question": t, "answer": t.split()[0], "documents": [t], "topic": f"t{i % 3}"}
            for i, t in enumerate(texts(18, 11, length=3))]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["rag", "eval", "--dataset", str(data), "--clients", "3", "--k", "1", "--route", "topn:1",
                 "--encoder", tiny_bert, "--generator", tiny_llama, "--max-new-tokens", "2", "--max-questions", "6",
                 "--output", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    lines = capsys.readouterr().out.strip().splitlines()
    assert set(result["conditions"]) == {"all", "central", "topn:1", "none"}
    assert result["conditions"]["all"]["recall_at_k"] == result["conditions"]["central"]["recall_at_k"] == 1.0
    assert result["conditions"]["topn:1"]["clients_per_question"] == 1.0
    assert set(result["conditions"]["none"]["answers"]) == {"exact_match", "rouge_l"}
    assert lines[-1].startswith("recall@1: federated 1.000, central 1.000; topn:1")


@pytest.mark.parametrize("argv, expected", [
    (["rag", "query", "q", "--index", "{missing}", "--no-generate"], "no index here"),
    (["rag", "query", "q", "--index", "{index}", "--encoder", "{other}", "--no-generate"], "encoder mismatch"),
    (["rag", "query", "q", "--index", "{index}", "--route", "topn:0", "--no-generate"], "--route 'topn:0'"),
    (["rag", "query", " ", "--index", "{index}", "--no-generate"], "the question is empty"),
    (["rag", "query", "q", "--index", "{index}", "--k", "0", "--no-generate"], "--k 0"),
    (["rag", "index", "--documents", "{empty}", "--output", "{out}"], "the document store is empty"),
    (["rag", "index", "--documents", "{missing}", "--output", "{out}"], "no such file or folder"),
    (["rag", "eval", "--dataset", "{missing}", "--no-generate"], "--dataset"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, tiny_bert: str, tiny_llama: str, argv: list[str],
                                          expected: str, capsys: pytest.CaptureFixture) -> None:
    index = tmp_path / "index"
    assert main(["rag", "index", "--documents", str(_corpus(tmp_path)), "--encoder", tiny_bert, "--output",
                 str(index)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n")
    capsys.readouterr()
    paths = {"missing": str(tmp_path / "nowhere"), "index": str(index), "other": tiny_llama, "empty": str(empty),
             "out": str(tmp_path / "out")}
    argv = [a.format(**paths) for a in argv]
    if "--encoder" not in argv and argv[1] != "eval":
        argv += ["--encoder", tiny_bert]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
