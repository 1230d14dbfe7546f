"""One client's vector index, persisted in a folder: ``index.faiss`` (faiss: exact inner product by default,
HNSW as an option), ``documents.jsonl`` (id and text per vector, in index order) and ``index.json`` (the encoder
that made the vectors, their dimension, the kind of index and the few unit centroids a router compares questions
to: spherical k-means of the client's vectors, so a client whose documents span several subjects is found by
each of them)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcustom.errors import FedCustomError
from fedcustom.rag.documents import Document

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw")
HNSW_NEIGHBOURS = 32  # faiss' M: links per vector (its documented default range is 16-64)
ROUTING_CENTROIDS = 8  # unit k-means centroids a client shares once for routing (8 x dim floats: 12 KB for MiniLM)
CENTROID_MEMBERS = 5  # fewest documents a routing centroid averages (one document's embedding would identify it)
LLOYD_STEPS = 5  # k-means steps after each dissolved cluster
META, VECTORS, DOCS = "index.json", "index.faiss", "documents.jsonl"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise FedCustomError("retrieval needs faiss: pip install 'fedcustom[rag]' (faiss-cpu)") from None
    return faiss


@dataclass
class ClientIndex:
    """Documents and their unit vectors in a faiss index."""

    documents: list[Document]
    index: object  # faiss.Index
    encoder: str
    dim: int
    kind: str
    centroids: np.ndarray  # (n, dim) unit vectors summarising the documents, for routing

    @classmethod
    def build(cls, documents: list[Document], vectors: np.ndarray, encoder: str, kind: str = "flat") -> ClientIndex:
        if kind not in INDEX_KINDS:
            raise FedCustomError(f"--index-kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
        if not documents:
            raise FedCustomError("cannot index an empty document store")
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        return cls(documents, index, encoder, dim, kind, routing_centroids(vectors))

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[Document, float]]]:
        """The k nearest documents (highest inner product first) for each row of ``vectors``."""
        if vectors.shape[1] != self.dim:
            raise FedCustomError(f"query vectors have dimension {vectors.shape[1]}, this index {self.dim} "
                                 f"(made with encoder {self.encoder!r})")
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self.documents)))
        return [[(self.documents[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self.index, str(folder / VECTORS))
        with open(folder / DOCS, "w", encoding="utf-8") as f:
            for doc in self.documents:
                f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
        meta = {"encoder": self.encoder, "dim": self.dim, "kind": self.kind, "documents": len(self.documents),
                "centroids": self.centroids.tolist(), "centroid_members": CENTROID_MEMBERS}
        (folder / META).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ClientIndex:
        folder = Path(folder).expanduser()
        missing = [name for name in (META, VECTORS, DOCS) if not (folder / name).is_file()]
        if missing:
            raise FedCustomError(f"--index {folder}: no index here (missing {', '.join(missing)}); build one with "
                                 f"`fedcustom rag index`")
        meta = json.loads((folder / META).read_text())
        documents = [Document(**json.loads(line)) for line in (folder / DOCS).read_text(encoding="utf-8").splitlines()]
        index = _faiss().read_index(str(folder / VECTORS))
        if index.ntotal != len(documents) or index.d != meta["dim"]:
            raise FedCustomError(f"--index {folder}: {index.ntotal} vectors of dimension {index.d} but "
                                 f"{len(documents)} documents and dimension {meta['dim']} recorded; rebuild it")
        centroids = np.asarray(meta["centroids"], dtype=np.float32).reshape(-1, int(meta["dim"]))
        if meta.get("centroid_members") != CENTROID_MEMBERS:  # an index built before centroids averaged enough
            log.warning("--index %s: built by an older fedcustom, whose routing centroids may each be one "
                        "document's embedding; they are not shared, so --route topn asks this client every question "
                        "(rebuild the index with `fedcustom rag index` to route to it)", folder)
            centroids = np.zeros((0, int(meta["dim"])), dtype=np.float32)
        return cls(documents, index, meta["encoder"], int(meta["dim"]), meta["kind"], centroids)


def routing_centroids(vectors: np.ndarray, count: int = ROUTING_CENTROIDS, seed: int = 0,
                      members: int = CENTROID_MEMBERS) -> np.ndarray:
    """Up to ``count`` unit centroids of unit ``vectors``, each the normalized mean of at least ``members`` of them
    (one centroid, the mean of all, when there are fewer). Faiss' spherical k-means alone leaves clusters of one
    document in a small store (9 documents: 7 of 8 centroids were a document's own embedding), and a centroid that
    is one document's embedding lets the server confirm a guess of its text; so the smallest cluster is dissolved
    into its neighbours' until every cluster has ``members`` documents."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count = max(1, min(count, len(vectors) // members))
    if count == 1:
        return _unit_means(vectors, np.zeros(len(vectors), dtype=np.int64), 1)
    kmeans = _faiss().Kmeans(vectors.shape[1], count, niter=20, seed=seed, spherical=True, verbose=False,
                             min_points_per_centroid=1)  # a small store is fine: no warning
    kmeans.train(vectors)
    centroids = kmeans.centroids.astype(np.float32)
    while True:
        assigned = np.argmax(vectors @ centroids.T, axis=1)
        sizes = np.bincount(assigned, minlength=len(centroids))
        if sizes.min() >= members or len(centroids) == 1:
            return _unit_means(vectors, assigned, len(centroids))
        kept = np.delete(centroids, int(np.argmin(sizes)), axis=0)
        for _ in range(LLOYD_STEPS):  # the dissolved cluster's documents pull their new centroids toward them
            assigned = np.argmax(vectors @ kept.T, axis=1)
            kept = _unit_means(vectors, assigned, len(kept), fallback=kept)
        centroids = kept


def _unit_means(vectors: np.ndarray, assigned: np.ndarray, count: int,
                fallback: np.ndarray | None = None) -> np.ndarray:
    """The unit-length mean of the vectors assigned to each of ``count`` clusters (an empty one: ``fallback``'s)."""
    means = np.stack([vectors[assigned == c].mean(axis=0) if (assigned == c).any() else fallback[c]
                      for c in range(count)])
    return (means / np.linalg.norm(means, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


def index_folders(root: str | Path) -> list[Path]:
    """The client index folders under ``root``: ``root`` itself if it is one, else its ``client-*`` subfolders."""
    root = Path(root).expanduser()
    if (root / META).is_file():
        return [root]
    found = sorted((p for p in root.glob("client-*") if (p / META).is_file()), key=lambda p: _client_number(p))
    if not found:
        raise FedCustomError(f"--index {root}: no index here (no {META}, no client-*/{META}); build one with "
                             f"`fedcustom rag index`")
    return found


def _client_number(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
