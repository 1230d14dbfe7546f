"""Building client indexes: one per document source, or one corpus split over N clients (by a column such as a
topic, whole groups per client, or round robin), encoded once and saved as ``client-<i>/`` folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcustom.errors import FedCustomError
from fedcustom.rag.documents import Document, load_documents, make_documents
from fedcustom.rag.encoder import Encoder
from fedcustom.rag.index import ClientIndex


def split_groups(groups: Sequence[str], clients: int) -> list[int]:
    """The client of each row: whole groups, dealt largest first to the client with the fewest rows so far
    (deterministic; every client gets at least one group when there are enough)."""
    if clients < 1:
        raise FedCustomError(f"--clients {clients}: expected a whole number >= 1")
    names = sorted(set(groups))
    if len(names) < clients:
        raise FedCustomError(f"{len(names)} groups cannot be split over {clients} clients without an empty one")
    size = {g: 0 for g in names}
    for g in groups:
        size[g] += 1
    load = [0] * clients
    owner: dict[str, int] = {}
    for g in sorted(names, key=lambda g: (-size[g], g)):
        client = min(range(clients), key=lambda c: (load[c], c))
        owner[g] = client
        load[client] += size[g]
    return [owner[g] for g in groups]


def index_stores(stores: list[list[Document]], encoder: Encoder, kind: str = "flat") -> list[ClientIndex]:
    """One index per client's documents."""
    for i, docs in enumerate(stores):
        if not docs:
            raise FedCustomError(f"client {i}: the document store is empty")
    return [ClientIndex.build(docs, encoder.encode([d.text for d in docs]), encoder.name, kind) for docs in stores]


def split_store(texts: list[str], groups: list[str] | None, clients: int) -> list[list[Document]]:
    """A corpus' texts as ``clients`` stores: by group when given, else round robin."""
    owners = split_groups(groups, clients) if groups is not None else [i % clients for i in range(len(texts))]
    return [make_documents([t for t, o in zip(texts, owners) if o == c]) for c in range(clients)]


def build_indexes(sources: list[str], output: str | Path, encoder: Encoder, kind: str = "flat",
                  clients: int | None = None, text_column: str | None = None,
                  group_column: str | None = None) -> list[Path]:
    """``fedcustom rag index``: each source one client, or (``clients``) one source split; saved under ``output``."""
    if not sources:
        raise FedCustomError("--documents: give at least one document store")
    if clients is not None and len(sources) != 1:
        raise FedCustomError(f"--clients {clients} splits one --documents source; {len(sources)} were given (each "
                             f"source is already one client)")
    if clients is None:
        stores = [load_documents(source, text_column) for source in sources]
    else:
        texts, groups = _texts_and_groups(sources[0], text_column, group_column)
        stores = split_store(texts, groups, clients)
    root = Path(output).expanduser()
    return [index.save(root / f"client-{i}") for i, index in enumerate(index_stores(stores, encoder, kind))]


def _texts_and_groups(source: str, text_column: str | None, group_column: str | None) -> tuple[list[str], list[str] | None]:
    from fedcustom.rag.documents import read_texts

    if group_column is None:
        return read_texts(source, text_column), None
    from fedcustom.rag.documents import TABLE_READERS, _column, read_table

    path = Path(source).expanduser()
    if path.suffix.lower() not in TABLE_READERS or not path.is_file():
        raise FedCustomError(f"--group-column needs a table file; --documents {source} is not one")
    frame = read_table(path)
    if group_column not in frame.columns:
        raise FedCustomError(f"--group-column {group_column!r}: not a column of {source} "
                             f"(columns: {', '.join(map(str, frame.columns))})")
    column = _column(frame, text_column, path)
    frame = frame.dropna(subset=[column])
    return [str(v) for v in frame[column]], [str(v) for v in frame[group_column].fillna("")]


def vectors_of(index: ClientIndex) -> np.ndarray:
    """The stored vectors of a flat index (for tests and a central index built from clients' vectors)."""
    return index.index.reconstruct_n(0, index.index.ntotal)
