"""--image-size with each kind of Hugging Face image processor: the image is resized to that size, not padded to
the processor's own crop, and a ViT-style model asked for a size its position embeddings do not fit is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (ConvNextImageProcessor, DeiTImageProcessor, ResNetConfig, ResNetForImageClassification,
                          ViTConfig, ViTForImageClassification, ViTImageProcessor)

from fedcustom.errors import ConfigError
from fedcustom.vision import load_image_processor

BRIGHT = Image.fromarray(np.full((40, 40), 255, dtype=np.uint8))  # a white image: any padding shows as other values


def _save(folder: Path, model: torch.nn.Module, processor) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("image-processors")
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32, num_labels=2))
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=2))
    return {
        "vit": _save(root / "vit", vit, ViTImageProcessor(size={"height": 32, "width": 32})),
        # DeiT's processors resize to 256 and center-crop 224: here 36 and 32
        "deit": _save(root / "deit", vit, DeiTImageProcessor(size={"height": 36, "width": 36},
                                                             crop_size={"height": 32, "width": 32})),
        # ConvNeXt's (also ResNet's on the Hub): a shortest edge, then a crop_pct crop
        "convnext": _save(root / "convnext", resnet, ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)),
    }


@pytest.mark.parametrize("kind, size", [("deit", 32), ("convnext", 16), ("convnext", 48), ("vit", 32)])
def test_the_image_is_resized_to_the_size_asked_for_with_no_padding(backbones: dict[str, str], kind: str,
                                                                      size: int) -> None:
    pixels = load_image_processor(backbones[kind], size)([BRIGHT])["pixel_values"]
    assert pixels.shape == (1, 3, size, size)
    assert torch.allclose(pixels, pixels.flatten()[0])  # every pixel is the white image's, none padding


def test_a_vit_is_refused_a_size_its_position_embeddings_do_not_fit(backbones: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"--image-size 16: .*32 x 32 images; leave --image-size out or set it to 32"):
        load_image_processor(backbones["vit"], 16)
