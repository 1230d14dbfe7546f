"""Image classification: a new head on a pretrained vision backbone (EfficientNet-Lite0, or any Hugging Face
image-classification model), labelled images, accuracy and macro-F1. Methods: full fine-tuning, LoRA on the
convolution and linear layers, head-only training, and visual prompt tuning of ViT-family backbones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedcustom.tasks.base import Metrics, Task, save_labels_beside_adapter


class ImageClassification(Task):
    name = "image-classification"
    metrics = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
    peft_task_type = None  # PEFT's task types are for text; its plain PeftModel passes pixel_values through
    default_max_length = None  # no tokens
    methods = ("full", "lora", "head", "prompt")  # prompt: visual prompt tuning (ViT-family backbones)
    kd_temperature = 2.0

    def load_processor(self, name: str, cfg: Any) -> Any:
        from fedcustom.models import quiet_transformers
        from fedcustom.vision import load_image_processor

        quiet_transformers()
        return load_image_processor(name, cfg.model.image_size)

    def load_backbone(self, name: str, label_names: list[str], tokenizer: Any, **extra: Any) -> Any:
        from fedcustom.errors import FedCustomError
        from fedcustom.vision import load_image_classifier

        if extra:
            raise FedCustomError("--load-in: quantized loading is for text backbones")
        return load_image_classifier(name, label_names)

    def lora_defaults(self, backbone: Any) -> dict[str, Any]:
        from fedcustom.vision import head_names, lora_targets

        return {"target_modules": lora_targets(backbone), "modules_to_save": head_names(backbone)}

    def prepare_data(self, cfg: Any, tokenizer: Any, public: Any) -> Any:
        from fedcustom.data.images import prepare_image_data

        return prepare_image_data(cfg.data, cfg.federation.clients, cfg.train.seed)

    def own_table(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        from fedcustom.data.images import load_images

        return load_images(data_path, "train", label_names).table()

    def own_labels(self, cfg: Any, label_names: list[str], data_path: str) -> list[int | None]:
        from fedcustom.data.images import load_images

        return load_images(data_path, "train", label_names).labels.tolist()

    def evaluator(self, cfg: Any, model: Any, rows: Any, tokenizer: Any) -> Callable[[], Metrics]:
        from fedcustom.training import evaluate

        batch = 2 * cfg.train.batch_size
        return lambda: evaluate(model, rows.table, tokenizer, batch)

    def validation_score(self, cfg: Any, model: Any, table: Any, tokenizer: Any) -> float:
        from fedcustom.training import evaluate

        return evaluate(model, table, tokenizer, 2 * cfg.train.batch_size)["accuracy"]

    def describe_saved(self, model: Any, out_dir: Any) -> None:
        """A PEFT adapter folder gets the backbone's config (labels)."""
        save_labels_beside_adapter(model, out_dir)
