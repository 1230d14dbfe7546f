"""Text classification: a freshly initialised head on the backbone, labelled texts, accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedcustom.tasks.base import Metrics, Task, save_labels_beside_adapter


class Classification(Task):
    name = "classification"
    metrics = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    peft_task_type = "SEQ_CLS"
    default_max_length = 64
    kd_temperature = 2.0  # Hinton et al.

    def describe_saved(self, model: Any, out_dir: Any) -> None:
        """The adapter names its classes: ``AutoModelForSequenceClassification.from_pretrained(base,
        config=AutoConfig.from_pretrained(adapter))`` (see README)."""
        save_labels_beside_adapter(model, out_dir)

    def load_backbone(self, name: str, label_names: list[str], tokenizer: Any, **extra: Any) -> Any:
        from fedcustom.models import load_classifier

        return load_classifier(name, label_names, tokenizer, **extra)

    def prepare_data(self, cfg: Any, tokenizer: Any, public: Any) -> Any:
        from fedcustom.data import prepare_data

        return prepare_data(cfg.data, cfg.federation.clients, cfg.train.seed, tokenizer, cfg.model.max_length, public)

    def own_table(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        from fedcustom.data import FileLayout, load_labeled
        from fedcustom.data.features import tokenize

        rows = load_labeled(data_path, cfg.data.text_column, cfg.data.label_column, label_names,
                            layout=FileLayout.of(cfg.data)).dataset
        return tokenize(rows, tokenizer, cfg.model.max_length)

    def own_labels(self, cfg: Any, label_names: list[str], data_path: str) -> list[int | None]:
        from fedcustom.data import FileLayout, load_labeled

        return list(load_labeled(data_path, cfg.data.text_column, cfg.data.label_column, label_names,
                                 layout=FileLayout.of(cfg.data)).dataset["label"])

    def evaluator(self, cfg: Any, model: Any, rows: Any, tokenizer: Any) -> Callable[[], Metrics]:
        from fedcustom.training import evaluate

        batch = 2 * cfg.train.batch_size
        return lambda: evaluate(model, rows.table, tokenizer, batch)

    def validation_score(self, cfg: Any, model: Any, table: Any, tokenizer: Any) -> float:
        from fedcustom.training import evaluate

        return evaluate(model, table, tokenizer, 2 * cfg.train.batch_size)["accuracy"]

    def public_set(self, public: list, tokenizer: Any, max_length: int) -> Any:
        from fedcustom.protocols.distill.public_set import TextPublicSet

        return TextPublicSet(public, tokenizer, max_length)

    def task_text(self, backbone: Any) -> str:
        labels = [str(v) for _, v in sorted(getattr(backbone.config, "id2label", {}).items())]
        return "Classify the text as " + ", ".join(labels) + "." if labels else "Classify the text."
