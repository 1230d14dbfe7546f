"""A client's private documents: a folder of text files, or a column of a JSONL/JSON/CSV/TSV/Parquet file.

Every document is named by the hash of its text, so the same passage held by two clients is one document to the
server (deduplication) and an id reveals nothing but equality."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Any

from fedcustom.errors import FedCustomError

if TYPE_CHECKING:
    import pandas as pd

TEXT_SUFFIXES = (".txt", ".md")
TABLE_READERS = {".jsonl": ("read_json", {"lines": True}), ".json": ("read_json", {}), ".csv": ("read_csv", {}),
                 ".tsv": ("read_csv", {"sep": "\t"}), ".parquet": ("read_parquet", {})}  # pandas reader, options
TEXT_COLUMNS = ("text", "document", "passage", "content", "answer")


@dataclass(frozen=True)
class Document:
    id: str  # content hash (first 16 hex digits of SHA-256 of the text)
    text: str


def document_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_documents(texts: list[str]) -> list[Document]:
    """Documents from texts: stripped, empty ones dropped, duplicates kept once (first occurrence's order)."""
    seen: dict[str, Document] = {}
    for text in texts:
        text = str(text).strip()
        if text:
            seen.setdefault(document_id(text), Document(document_id(text), text))
    return list(seen.values())


def read_table(path: Path) -> pd.DataFrame:
    """A table file by its suffix (pandas is imported here: the CLI parser imports this module)."""
    import pandas

    name, options = TABLE_READERS[path.suffix.lower()]
    reader: Any = getattr(pandas, name)
    try:
        return reader(path, **options)
    except (ValueError, json.JSONDecodeError, OSError) as exc:
        raise FedCustomError(f"--documents {path}: not a readable {path.suffix} file ({exc})") from None


def _column(frame: pd.DataFrame, column: str | None, source: Path) -> str:
    if column is not None:
        if column not in frame.columns:
            raise FedCustomError(f"--documents {source}: no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
        return column
    for name in TEXT_COLUMNS:
        if name in frame.columns:
            return name
    raise FedCustomError(f"--documents {source}: no text column; expected one of {', '.join(TEXT_COLUMNS)} or "
                         f"--text-column NAME (columns: {', '.join(map(str, frame.columns))})")


def read_texts(source: str | Path, column: str | None = None) -> list[str]:
    """The raw texts of a folder (one document per .txt/.md file, sorted by name) or a table's text column."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if not path.is_file():
        raise FedCustomError(f"--documents {source}: no such file or folder")
    if path.suffix.lower() not in TABLE_READERS:
        raise FedCustomError(f"--documents {source}: expected a folder of {'/'.join(TEXT_SUFFIXES)} files or a "
                             f"{'/'.join(TABLE_READERS)} file")
    frame = read_table(path)
    return [str(v) for v in frame[_column(frame, column, path)].dropna()]


def load_documents(source: str | Path, column: str | None = None) -> list[Document]:
    """A store's documents; an error names the source when it holds none."""
    documents = make_documents(read_texts(source, column))
    if not documents:
        raise FedCustomError(f"--documents {source}: the document store is empty (no non-empty text)")
    return documents
