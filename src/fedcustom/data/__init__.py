"""Data for a federated run: load, hold out an evaluation set, subsample, partition, tokenize."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import datasets
import numpy as np
from sklearn.model_selection import train_test_split
from transformers import PreTrainedTokenizerBase

from fedcustom.config import DataConfig, parse_partition
from fedcustom.data.features import make_loader, tokenize
from fedcustom.data.partition import label_histogram, partition_indices
from fedcustom.data.public import carve_public, load_public
from fedcustom.data.sources import (PACKAGED_DATASETS, FileLayout, LabeledData, check_split_flags, is_local,
                                    load_labeled)
from fedcustom.errors import FedCustomError

__all__ = ["EvalRows", "FederatedData", "FileLayout", "PACKAGED_DATASETS", "LabeledData", "PublicSpec", "load_labeled", "make_loader", "prepare_data",
           "stratified_split"]


HOLD_OUT_STREAM = 11  # separates the per-client test split's draws from every other seeded draw


def hold_out(count: int, fraction: float, seed: int, client: int) -> tuple[list[int], list[int]]:
    """Which of a client's ``count`` rows (positions) it keeps for training and which it holds out for its own
    evaluation: ``fraction`` of them, seeded per client, at least one and never all (a single row is kept). The
    server's simulation and a Flower node reading its own file draw the same."""
    order = np.random.default_rng([seed, client, HOLD_OUT_STREAM]).permutation(count).tolist()
    held = min(max(1, round(fraction * count)), count - 1) if count > 1 else 0
    return order[held:], order[:held]


@dataclass(frozen=True)
class EvalRows:
    """Rows to score a model on, as a task's evaluator reads them: the tokenized table and, for a causal LM, each
    row's prompt and reference answer (the model answers the prompts; ROUGE-L and exact match compare)."""

    table: datasets.Dataset
    prompts: list[str] | None = None
    references: list[str] | None = None

    def __len__(self) -> int:
        return len(self.table)

    def select(self, positions: list[int]) -> EvalRows:
        """These rows at ``positions`` (in that order), prompts and references with them."""
        pick = lambda values: [values[i] for i in positions] if values is not None else None  # noqa: E731
        return EvalRows(self.table.select(positions), pick(self.prompts), pick(self.references))


@dataclass(frozen=True)
class FederatedData:
    """Tokenized training rows split over clients, plus the server's held-out evaluation set."""

    train: datasets.Dataset  # tokenized union of all clients' rows
    test: EvalRows  # the server's held-out rows (the global test set; a causal LM's with prompts and answers)
    client_indices: list[list[int]]  # rows of ``train`` each client owns
    label_names: list[str]
    raw_train: datasets.Dataset | None = None  # the same rows as ``train`` as text, label (to re-tokenize)
    # KD-FedLLM's public set, disjoint from every client's rows: unlabelled texts (classification) or
    # [prompt, response] pairs (causal LM: knowledge is the next-token distribution on each response token)
    public: list[str] | list[list[str]] | None = None
    groups: list[int] | None = None  # causal LM: each training row's topic (``label_names`` names them)
    client_eval_indices: list[list[int]] | None = None  # rows of ``train`` each client holds out for its own test
    train_prompts: list[str] | None = None  # causal LM: each training row's prompt and answer (a client's own test)
    train_references: list[str] | None = None

    def client_held_out(self, client: int) -> EvalRows:
        """The rows client ``client`` holds out for its own evaluation (see :meth:`holding_out`), tokenized, with
        their prompts and answers (causal LM)."""
        if self.client_eval_indices is None:
            raise ValueError("this FederatedData holds out no per-client evaluation rows")
        rows = EvalRows(self.train, self.train_prompts, self.train_references)
        return rows.select(self.client_eval_indices[client])

    def holding_out(self, fraction: float, seed: int) -> FederatedData:
        """This data with ``fraction`` of each client's rows (seeded, at least one, never all) moved from its training
        rows to its own test rows; a client with a single row keeps it for training."""
        keep, held = [], []
        for client, rows in enumerate(self.client_indices):
            kept, out = hold_out(len(rows), fraction, seed, client)
            held.append(sorted(rows[i] for i in out))
            keep.append(sorted(rows[i] for i in kept))
        return dataclasses.replace(self, client_indices=keep, client_eval_indices=held)

    def retokenized(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> FederatedData:
        """The same rows tokenized for another backbone (heterogeneous clients in KD-FedLLM)."""
        if self.raw_train is None:
            raise ValueError("this FederatedData keeps no raw texts to re-tokenize")
        return dataclasses.replace(self, train=tokenize(self.raw_train, tokenizer, max_length))

    def client_table(self, client: int) -> datasets.Dataset:
        """The tokenized rows client ``client`` owns."""
        return self.train.select(self.client_indices[client])

    def client_stats(self) -> list[dict]:
        """Per-client example count and label (causal LM: topic) histogram, for the report and summary."""
        labels = np.asarray(self.groups if self.groups is not None else self.train["labels"])
        return [
            {"client": i, "examples": len(rows), "label_histogram": label_histogram(labels[rows].tolist(), len(self.label_names))}
            for i, rows in enumerate(self.client_indices)
        ]


def stratified_split(labels: list[int], keep: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, rest) with label shares preserved when every label has two or more rows."""
    index = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    try:
        kept, rest = train_test_split(index, train_size=keep, random_state=seed, stratify=stratify)
    except ValueError:  # too few rows per class for a stratified draw of this size
        kept, rest = train_test_split(index, train_size=keep, random_state=seed)
    return sorted(kept.tolist()), sorted(rest.tolist())


def _subsample(data: LabeledData, limit: int | None, seed: int) -> tuple[LabeledData, LabeledData]:
    """(kept, spare): at most ``limit`` rows, label shares preserved, and the rows left out."""
    if limit is None or limit >= len(data):
        return data, LabeledData(data.dataset.select([]), data.label_names)
    kept, rest = stratified_split(data.dataset["label"], limit, seed)
    return LabeledData(data.dataset.select(kept), data.label_names), LabeledData(data.dataset.select(rest), data.label_names)


def _split_seed(cfg: DataConfig, seed: int) -> int:
    return seed if cfg.split_seed is None else cfg.split_seed


def load_splits(cfg: DataConfig, seed: int) -> tuple[LabeledData, LabeledData]:
    """Training and evaluation sets, before subsampling and partitioning."""
    layout = FileLayout.of(cfg)
    check_split_flags(cfg, has_splits=cfg.dataset not in PACKAGED_DATASETS and not is_local(cfg.dataset))
    train = load_labeled(cfg.dataset, cfg.text_column, cfg.label_column, split=cfg.train_split, layout=layout)
    if len(train.label_names) < 2:
        raise FedCustomError(f"dataset {cfg.dataset}: every row has the label {train.label_names[0]!r}; "
                             "classification needs at least 2 classes (is --label-column the right column?)")
    if cfg.eval_dataset:
        evaluation = load_labeled(cfg.eval_dataset, cfg.text_column, cfg.label_column, train.label_names,
                                  cfg.eval_split or "test", layout)
        return train, evaluation
    if cfg.eval_split:
        evaluation = load_labeled(cfg.dataset, cfg.text_column, cfg.label_column, train.label_names, cfg.eval_split,
                                  layout)
        return train, evaluation
    keep = len(train) - max(1, round(len(train) * cfg.eval_fraction))
    kept, held_out = stratified_split(train.dataset["label"], keep, _split_seed(cfg, seed))
    table = train.dataset
    return LabeledData(table.select(kept), train.label_names), LabeledData(table.select(held_out), train.label_names)


@dataclass(frozen=True)
class PublicSpec:
    """The public set a KD-FedLLM run needs: ``size`` texts, from ``source`` or spare training rows."""

    size: int
    source: str | None = None


def prepare_data(
    cfg: DataConfig, num_clients: int, seed: int, tokenizer: PreTrainedTokenizerBase, max_length: int,
    public: PublicSpec | None = None,
) -> FederatedData:
    """Everything the clients and the server's evaluator need, deterministic for a seed."""
    train, evaluation = load_splits(cfg, seed)
    train, spare = _subsample(train, cfg.max_train_examples, seed)
    evaluation, _ = _subsample(evaluation, cfg.max_eval_examples, _split_seed(cfg, seed))
    indices = partition_indices(train.dataset, parse_partition(cfg.partition), num_clients, seed)
    texts = None
    if public is not None and public.source:
        texts = load_public(public.source, public.size, seed, cfg.text_column)
    elif public is not None:
        texts = carve_public(spare, public.size, seed, used=len(train))
    return FederatedData(
        train=tokenize(train.dataset, tokenizer, max_length),
        test=EvalRows(tokenize(evaluation.dataset, tokenizer, max_length)),
        client_indices=indices,
        label_names=train.label_names,
        raw_train=train.dataset,
        public=texts,
    )
