"""Text classification: a freshly initialised head on the backbone, labelled texts, accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedcustom.tasks.base import Metrics, Task


class Classification(Task):
    name = "classification"
    metrics = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    peft_task_type = "SEQ_CLS"
    default_max_length = 64
    kd_temperature = 2.0  # Hinton et al.

    def describe_saved(self, model: Any, out_dir: Any) -> None:
        """A PEFT adapter folder gets the backbone's config with the head's ``id2label``/``label2id`` beside
        ``adapter_config.json``: ``AutoModelForSequenceClassification.from_pretrained(base,
        config=AutoConfig.from_pretrained(adapter))`` then names its classes (PEFT's own files carry no labels). A
        whole-model folder has its config already."""
        from pathlib import Path

        folder = Path(out_dir)
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists():
            backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
            backbone.config.save_pretrained(folder)

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

    def describe_own_data(self, cfg: Any, label_names: list[str], data_path: str) -> dict[str, Any]:
        from fedcustom.data import FileLayout, load_labeled
        from fedcustom.data.partition import label_histogram

        rows = load_labeled(data_path, cfg.data.text_column, cfg.data.label_column, label_names,
                            layout=FileLayout.of(cfg.data)).dataset
        return {"examples": len(rows), "histogram": label_histogram(rows["label"], len(label_names))}

    def evaluator(self, cfg: Any, model: Any, data: Any, tokenizer: Any) -> Callable[[], Metrics]:
        from fedcustom.training import evaluate

        batch = 2 * cfg.train.batch_size
        return lambda: evaluate(model, data.eval, tokenizer, batch)

    def validation_score(self, cfg: Any, model: Any, table: Any, tokenizer: Any) -> float:
        from fedcustom.training import evaluate

        return evaluate(model, table, tokenizer, 2 * cfg.train.batch_size)["accuracy"]

    def public_set(self, public: list, tokenizer: Any, max_length: int) -> Any:
        from fedcustom.protocols.distill.public_set import TextPublicSet

        return TextPublicSet(public, tokenizer, max_length)

    def task_text(self, backbone: Any) -> str:
        labels = [str(v) for _, v in sorted(getattr(backbone.config, "id2label", {}).items())]
        return "Classify the text as " + ", ".join(labels) + "." if labels else "Classify the text."
