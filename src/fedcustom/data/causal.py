"""Instruction data for causal-LM customization: chat-templated prompts, loss on response tokens only.

Each row becomes ``prompt tokens + response tokens + EOS``; the labels are -100 (ignored by the
loss) on the prompt, so a client learns to answer, not to repeat questions. Rows are padded per
batch (DataCollatorForSeq2Seq pads labels with -100 too). The topic column (e.g. the chatterbot
corpus' file category) plays the role labels play for classification: client statistics, and
label-skew partitions (``dirichlet``, ``shards``) or ``column:topic`` (each topic on one client).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from fedcustom.config import DataConfig, parse_partition
from fedcustom.data import EvalRows, FederatedData, PublicSpec
from fedcustom.data.instructions import PACKAGED_INSTRUCTIONS, load_instructions
from fedcustom.data.sources import FileLayout, check_split_flags, is_local
from fedcustom.data.partition import partition_indices
from fedcustom.data.by_column import partition_by_column
from fedcustom.data.features import IGNORE_INDEX
from fedcustom.errors import FedCustomError
from fedcustom.generation import chat_prompt


NO_TOPIC = "(no topic)"  # the topic name of rows without one


def topic_name(topic: str) -> str:
    """A row's topic as a label name (rows without a topic share :data:`NO_TOPIC`)."""
    return topic or NO_TOPIC


@dataclass(frozen=True)
class InstructionRows:
    """Rows as text: the prompt (chat-templated), the reference response, and an integer topic."""

    prompts: list[str]
    responses: list[str]
    topics: list[int]


def as_rows(table: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, topic_names: list[str],
            chat_template: bool) -> InstructionRows:
    """Apply the chat template (or a plain join with ``chat_template=False``) to every row."""
    index = {name: i for i, name in enumerate(topic_names)}
    prompts = [chat_prompt(tokenizer, messages, raw=not chat_template) for messages in table["messages"]]
    return InstructionRows(prompts, list(table["response"]), [index[t] for t in table["topic"]])


def tokenize_rows(rows: InstructionRows, tokenizer: PreTrainedTokenizerBase, max_length: int,
                  where: str) -> datasets.Dataset:
    """input_ids, attention_mask and labels (-100 on the prompt); responses are cut at ``max_length``."""
    prompt_ids = tokenizer(rows.prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(rows.responses, add_special_tokens=False)["input_ids"]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) >= max_length]
    if too_long:
        first = too_long[0]
        raise FedCustomError(
            f"{where}: {len(too_long)} of {len(prompt_ids)} prompts leave no room for a response within "
            f"--max-length {max_length} (row {first}: {len(prompt_ids[first])} prompt tokens); raise --max-length or "
            f"shorten those prompts")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(prompt_ids, response_ids):
        ids = (prompt + response + eos)[:max_length]
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(([IGNORE_INDEX] * len(prompt) + response + eos)[:max_length])
    return datasets.Dataset.from_dict(columns)


def _split(count: int, keep: int, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng(seed).permutation(count)
    return sorted(order[:keep].tolist()), sorted(order[keep:].tolist())


def load_instruction_splits(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Training and evaluation rows (messages, response, topic), held out and subsampled by seed."""
    layout = FileLayout.of(cfg)
    check_split_flags(cfg, has_splits=cfg.dataset not in PACKAGED_INSTRUCTIONS and not is_local(cfg.dataset))
    train = load_instructions(cfg.dataset, cfg.train_split, cfg.text_column, cfg.label_column, layout)
    split_seed = seed if cfg.split_seed is None else cfg.split_seed
    if cfg.eval_dataset or cfg.eval_split:
        evaluation = load_instructions(cfg.eval_dataset or cfg.dataset, cfg.eval_split or "test", cfg.text_column,
                                       cfg.label_column, layout)
    else:
        keep = len(train) - max(1, round(len(train) * cfg.eval_fraction))
        kept, held = _split(len(train), keep, split_seed)
        train, evaluation = train.select(kept), train.select(held)
    if cfg.max_train_examples and cfg.max_train_examples < len(train):
        train = train.select(_split(len(train), cfg.max_train_examples, seed)[0])
    if cfg.max_eval_examples and cfg.max_eval_examples < len(evaluation):
        evaluation = evaluation.select(_split(len(evaluation), cfg.max_eval_examples, split_seed)[0])
    return train, evaluation


def partition_rows(train: datasets.Dataset, topics: list[int], spec: str, num_clients: int,
                   seed: int) -> list[list[int]]:
    """Rows per client: ``column:NAME`` puts each value of a metadata column (e.g. topic) wholly on one client;
    the other partitions treat the topic as the label (``dirichlet:ALPHA`` is topic skew)."""
    parsed = parse_partition(spec)
    if parsed.kind == "column":
        if parsed.column not in train.column_names:
            raise FedCustomError(f"--partition {spec}: the data has no column {parsed.column!r}; it has "
                                 f"{', '.join(c for c in train.column_names if c not in ('messages', 'response'))}")
        return partition_by_column([str(v) for v in train[parsed.column]], num_clients, seed)
    return partition_indices(datasets.Dataset.from_dict({"label": topics}), parsed, num_clients, seed)


def public_pairs(train: datasets.Dataset, public: PublicSpec, seed: int, tokenizer: PreTrainedTokenizerBase,
                 chat_template: bool, cfg: DataConfig) -> tuple[list[list[str]], datasets.Dataset]:
    """KD-FedLLM's public set for a causal LM: ``public.size`` [prompt, response] pairs (prompts chat-templated),
    from ``public.source`` or carved out of the training rows (which the clients then do not get)."""
    if public.source:
        rows = load_instructions(public.source, "train", cfg.text_column, cfg.label_column)
        rows = rows.select(_split(len(rows), min(public.size, len(rows)), seed)[0])
    else:
        if public.size >= len(train):
            raise FedCustomError(f"method.public_size (--public-size) {public.size}: the training set has only "
                                 f"{len(train)} rows; lower --public-size or give --public-dataset")
        kept, carved = _split(len(train), len(train) - public.size, seed + 1)
        rows, train = train.select(carved), train.select(kept)
    prompts = [chat_prompt(tokenizer, messages, raw=not chat_template) for messages in rows["messages"]]
    return [[p, r] for p, r in zip(prompts, rows["response"])], train


def prepare_causal_data(cfg: DataConfig, num_clients: int, seed: int, tokenizer: PreTrainedTokenizerBase,
                        max_length: int, chat_template: bool, public: PublicSpec | None = None) -> FederatedData:
    """Tokenized instruction rows split over clients, and the held-out prompts and references (and, for
    KD-FedLLM, the public [prompt, response] pairs)."""
    train, evaluation = load_instruction_splits(cfg, seed)
    pairs = None
    if public is not None:
        pairs, train = public_pairs(train, public, seed, tokenizer, chat_template, cfg)
    topic_names = sorted(set(train["topic"]) | set(evaluation["topic"]))
    train_rows = as_rows(train, tokenizer, topic_names, chat_template)
    eval_rows = as_rows(evaluation, tokenizer, topic_names, chat_template)
    indices = partition_rows(train, train_rows.topics, cfg.partition, num_clients, seed)
    test = tokenize_rows(eval_rows, tokenizer, max_length, f"evaluation rows of {cfg.eval_dataset or cfg.dataset}")
    return FederatedData(
        train=tokenize_rows(train_rows, tokenizer, max_length, f"--dataset {cfg.dataset}"),
        test=EvalRows(test, eval_rows.prompts, eval_rows.responses),
        client_indices=indices,
        label_names=[topic_name(name) for name in topic_names],
        groups=train_rows.topics,
        public=pairs,
        train_prompts=train_rows.prompts,
        train_references=train_rows.responses,
    )
