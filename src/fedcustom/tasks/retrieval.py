"""Retriever customization: a text encoder trained on (question, passage) pairs with an in-batch-negatives
contrastive loss (:mod:`fedcustom.rag.contrastive`), measured by recall@5 and MRR of each held-out question's
passage among all held-out passages. The data is instruction data (the packaged ``chatterbot`` corpus or any
prompt/response file): the last user turn is the question, the response its passage; topics play the labels'
part (client statistics, skewed partitions). The trained encoder (``model/``) or adapter is what
``fedcustom rag index --encoder`` takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedcustom.tasks.base import Metrics, Task


def _pairs(rows: Any) -> tuple[list[str], list[str]]:
    questions = [messages[-1]["content"] for messages in rows["messages"]]
    return questions, list(rows["response"])


class Retrieval(Task):
    name = "retrieval"
    metrics = (("recall_at_5", "recall@5"), ("mrr", "MRR"))
    peft_task_type = "FEATURE_EXTRACTION"
    default_max_length = 64
    instruction_data = True
    methods = ("full", "lora", "prompt", "prefix")  # one encoder for both sides: no head, no split or distillation
    no_dp_sgd = ("in-batch negatives make every row's loss depend on the other rows of its batch, so clipping each "
                 "row's gradient does not bound its influence")

    def head_modules(self, backbone: Any) -> list[str]:
        return []

    def load_backbone(self, name: str, label_names: list[str], tokenizer: Any, **extra: Any) -> Any:
        from transformers import AutoModel

        from fedcustom.models import _load_error, resolve_model
        from fedcustom.rag.contrastive import ContrastiveEncoder

        try:
            encoder = AutoModel.from_pretrained(resolve_model(name), **extra)
        except (OSError, ValueError) as exc:
            raise _load_error(name, exc) from None
        return ContrastiveEncoder(encoder)

    def _table(self, rows: Any, topics: list[str], tokenizer: Any, max_length: int) -> Any:
        from fedcustom.data.causal import topic_name
        from fedcustom.rag.contrastive import pair_table

        questions, passages = _pairs(rows)
        index = {t: i for i, t in enumerate(topics)}
        return pair_table(questions, passages, [index[topic_name(t)] for t in rows["topic"]], tokenizer, max_length)

    def prepare_data(self, cfg: Any, tokenizer: Any, public: Any) -> Any:
        from fedcustom.data import EvalRows, FederatedData
        from fedcustom.data.causal import load_instruction_splits, partition_rows, topic_name

        train, evaluation = load_instruction_splits(cfg.data, cfg.train.seed)
        topics = sorted({topic_name(t) for t in train["topic"]} | {topic_name(t) for t in evaluation["topic"]})
        table = self._table(train, topics, tokenizer, cfg.model.max_length)
        groups = list(table["labels"])
        indices = partition_rows(train, groups, cfg.data.partition, cfg.federation.clients, cfg.train.seed)
        return FederatedData(train=table, test=EvalRows(self._table(evaluation, topics, tokenizer, cfg.model.max_length)),
                             client_indices=indices, label_names=topics, groups=groups)

    def _own_rows(self, cfg: Any, data_path: str) -> Any:
        from fedcustom.data.instructions import load_instructions
        from fedcustom.data.sources import FileLayout

        return load_instructions(data_path, "train", cfg.data.text_column, cfg.data.label_column,
                                 FileLayout.of(cfg.data))

    def own_table(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        from fedcustom.data.causal import topic_name

        rows = self._own_rows(cfg, data_path)
        topics = list(label_names) + sorted({topic_name(t) for t in rows["topic"]} - set(label_names))
        return self._table(rows, topics, tokenizer, cfg.model.max_length)

    def describe_own_data(self, cfg: Any, label_names: list[str], data_path: str) -> dict[str, Any]:
        from fedcustom.data.causal import topic_name
        from fedcustom.data.partition import label_histogram

        topics = self._own_rows(cfg, data_path)["topic"]
        index = {name: i for i, name in enumerate(label_names)}
        known = [index[topic_name(t)] for t in topics if topic_name(t) in index]
        return {"examples": len(topics), "histogram": label_histogram(known, len(label_names))}

    def evaluator(self, cfg: Any, model: Any, rows: Any, tokenizer: Any) -> Callable[[], Metrics]:
        from fedcustom.rag.contrastive import retrieval_metrics

        return lambda: retrieval_metrics(model, rows.table, tokenizer, 2 * cfg.train.batch_size)

    def validation_score(self, cfg: Any, model: Any, table: Any, tokenizer: Any) -> float:
        from fedcustom.rag.contrastive import retrieval_metrics

        return retrieval_metrics(model, table, tokenizer, 2 * cfg.train.batch_size)["recall_at_5"]

    def task_text(self, backbone: Any) -> str:
        return "Represent the question for retrieving passages that answer it."
