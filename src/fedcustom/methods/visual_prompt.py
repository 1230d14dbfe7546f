"""Visual prompt tuning (VPT; Jia et al., ECCV 2022) for ViT-family backbones: learnable tokens inserted after the
patch embedding, between the [CLS] token and the patches. Shallow: one set before the first layer. Deep: a set of
its own at every layer's input (the previous layer's outputs at those positions are dropped). The backbone stays
frozen; the prompts and the classification head train and travel. PEFT has no visual prompts, so this is ours:
forward hooks on the Hugging Face model, which stays a plain ``ViTForImageClassification`` (or DeiT, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcustom.errors import FedCustomError


class VisualPrompts(nn.Module):
    """A ViT-family classifier with visual prompts; ``prompts`` and the head are its only trainable tensors."""

    def __init__(self, backbone: nn.Module, tokens: int, deep: bool, head: list[str]) -> None:
        super().__init__()
        base = getattr(backbone, getattr(backbone, "base_model_prefix", ""), None)
        layers = getattr(base, "layers", None)  # transformers 5; earlier: encoder.layer
        layers = layers if layers is not None else getattr(getattr(base, "encoder", None), "layer", None)
        if base is None or not hasattr(base, "embeddings") or layers is None:
            raise FedCustomError(f"visual prompt tuning (--method prompt on images) needs a ViT-family backbone "
                                 f"(embeddings, then encoder layers); {type(backbone).__name__} is not one")
        self.backbone = backbone
        self.tokens, self.deep = tokens, deep
        hidden = backbone.config.hidden_size
        for name, param in backbone.named_parameters():
            param.requires_grad_(name.split(".")[0] in head)
        # VPT's initialisation: uniform in +-sqrt(6 / (patch area * channels + hidden)) (Xavier over the patch)
        patch = getattr(backbone.config, "patch_size", 16)
        bound = (6.0 / (patch * patch * getattr(backbone.config, "num_channels", 3) + hidden)) ** 0.5
        self.prompts = nn.Parameter(torch.empty(len(layers) if deep else 1, tokens, hidden).uniform_(-bound, bound))
        base.embeddings.register_forward_hook(self._insert)
        if deep:
            for index, layer in enumerate(layers):
                if index:
                    layer.register_forward_pre_hook(self._replacer(index), with_kwargs=True)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def _insert(self, _module: nn.Module, _inputs: Any, embedded: torch.Tensor) -> torch.Tensor:
        """[CLS], prompts, patches."""
        prompts = self.prompts[0].to(embedded.dtype).expand(embedded.shape[0], -1, -1)
        return torch.cat([embedded[:, :1], prompts, embedded[:, 1:]], dim=1)

    def _replacer(self, index: int) -> Any:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            prompts = self.prompts[index].to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1 + self.tokens:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        return self.backbone(pixel_values=pixel_values, labels=labels)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """The trained tensors (prompts and head) as safetensors, the backbone's config, and how to rebuild."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        trained = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}
        save_file(trained, folder / "visual_prompts.safetensors")
        self.backbone.config.save_pretrained(folder)
        (folder / "visual_prompt_config.json").write_text(json.dumps({
            "base_model_name_or_path": self.backbone.config.name_or_path, "tokens": self.tokens, "deep": self.deep,
            "load": "fedcustom.methods.visual_prompt.load_visual_prompts(folder)"}, indent=1))


def load_visual_prompts(folder: str | Path) -> VisualPrompts:
    """A saved VPT model: the backbone from its base path (with the saved config's labels) plus the trained tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForImageClassification

    folder = Path(folder)
    meta = json.loads((folder / "visual_prompt_config.json").read_text())
    backbone = AutoModelForImageClassification.from_pretrained(meta["base_model_name_or_path"],
                                                               config=AutoConfig.from_pretrained(folder))
    tensors = load_file(folder / "visual_prompts.safetensors")
    head = sorted({name.split(".")[1] for name in tensors if name.startswith("backbone.")})
    model = VisualPrompts(backbone, meta["tokens"], meta["deep"], head)
    missing = model.load_state_dict(tensors, strict=False)
    if missing.unexpected_keys:
        raise FedCustomError(f"{folder}: unexpected tensors {missing.unexpected_keys[:3]}")
    return model
