"""The interface every task implements (see :mod:`fedcustom.tasks`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Metrics = dict[str, float]


def save_labels_beside_adapter(model: Any, out_dir: Any) -> None:
    """A PEFT adapter folder gets the backbone's config with the head's ``id2label``/``label2id`` beside
    ``adapter_config.json`` (PEFT's own files carry no labels); a whole-model folder has its config already."""
    from pathlib import Path

    folder = Path(out_dir)
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    if ((folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
            and hasattr(backbone.config, "save_pretrained")):
        backbone.config.save_pretrained(folder)


class Task:
    """What a run learns. Subclasses set the class attributes and implement the methods."""

    name: str
    metrics: tuple[tuple[str, str], ...]  # (key in the eval dict, column title); the first is the headline metric
    peft_task_type: str | None  # peft.TaskType value (None: PEFT's plain PeftModel)
    default_max_length: int | None  # tokens, when model.max_length is unset (None: the task has no tokens)
    instruction_data: bool = False  # rows are [prompt, response] pairs with metadata columns (column partitions)
    knowledge_over_vocabulary: bool = False  # distillation: knowledge is a next-token distribution per response token
    kd_temperature: float = 2.0  # distillation temperature when --kd-temperature is unset
    methods: tuple[str, ...] | None = None  # the methods this task supports (None: every registered one)
    no_dp_sgd: str | None = None  # why DP-SGD's per-example clipping cannot bound one row's influence (None: it can)

    @property
    def headline_metric(self) -> str:
        """The metric early stopping and round lines follow."""
        return self.metrics[0][0]

    def load_processor(self, name: str, cfg: Any) -> Any:
        """What turns a row into model inputs (text: the tokenizer; images: the image processor)."""
        from fedcustom.models import load_tokenizer

        return load_tokenizer(name)

    def head_modules(self, backbone: Any) -> list[str]:
        """The task head's module names (head-only training)."""
        from fedcustom.vision import head_names

        return head_names(backbone)

    def lora_defaults(self, backbone: Any) -> dict[str, Any]:
        """LoRA settings this task needs when the config leaves them unset (text: PEFT's own defaults)."""
        return {}

    def load_backbone(self, name: str, label_names: list[str], tokenizer: Any, **extra: Any) -> Any:
        """The pretrained backbone with this task's head (seeded by the caller; ``extra``: quantized loading)."""
        raise NotImplementedError

    def prepare_data(self, cfg: Any, tokenizer: Any, public: Any) -> Any:
        """The run's rows split over its clients (``fedcustom.data.FederatedData``), with a public set if asked."""
        raise NotImplementedError

    def own_table(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        """A Flower node's own rows from its own file, tokenized as the server tokenizes."""
        raise NotImplementedError

    def own_rows(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        """:meth:`own_table` as rows to score on (``fedcustom.data.EvalRows``; a causal LM adds each row's prompt and
        answer)."""
        from fedcustom.data import EvalRows

        return EvalRows(self.own_table(cfg, label_names, data_path, tokenizer))

    def own_labels(self, cfg: Any, label_names: list[str], data_path: str) -> list[int | None]:
        """The label (index into ``label_names``; None for one the server does not know) of each row of a node's own
        file, in the order of :meth:`own_table`'s rows: the node counts them for the server's client table."""
        raise NotImplementedError

    def evaluator(self, cfg: Any, model: Any, rows: Any, tokenizer: Any) -> Callable[[], Metrics]:
        """The task's metrics of ``model`` as it is when called, scored on ``rows`` (``fedcustom.data.EvalRows``: the
        global test set or a client's held-out rows)."""
        raise NotImplementedError

    def validation_score(self, cfg: Any, model: Any, table: Any, tokenizer: Any) -> float:
        """Higher is better: what the converged centralized baseline early-stops on."""
        raise NotImplementedError

    def public_set(self, public: list, tokenizer: Any, max_length: int) -> Any:
        """What KD-FedLLM's parties label (``fedcustom.protocols.distill.public_set``)."""
        raise NotImplementedError

    def describe_saved(self, model: Any, out_dir: Any) -> None:
        """Add what a stranger needs to use a saved adapter folder (default: nothing)."""

    def task_text(self, backbone: Any) -> str:
        """A plain sentence naming the task (prefix and prompt initialisation)."""
        raise NotImplementedError
