"""Split-FedLLM (arXiv 2501.04436): the model is cut in two, clients run the bottom, the server the top.

:mod:`~fedcustom.methods.split.cut` cuts the model, :mod:`~fedcustom.protocols.split.protocol` runs
SplitFed rounds over the runtime's send/receive primitive, :mod:`~fedcustom.protocols.split.driver`
gives those rounds the server interface the runner drives. The client half trains every weight, or
only LoRA adapters on its layers (``method.split_client = "lora"``), or only key/value prefixes on its
layers (``"prefix"``, :mod:`~fedcustom.methods.split.prefix`); the server half trains every weight.
U-shaped (``method.split_head = "client"``), the head runs on the client. Encoders (BERT) and
decoder-only models with a classification head (LLaMA) are cut for classification, decoder-only
causal LMs for instruction tuning (next-token loss on the response). Not yet done: parallel
SplitFed-V1 (one server half per client, averaged).
"""

import copy
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.config import MethodConfig
from fedcustom.errors import ConfigError
from fedcustom.methods.base import Method, peft_task_type, register, table_defaults
from fedcustom.methods.split.cut import SplitDecoder, SplitEncoder, SplitModel, cut_model
from fedcustom.methods.split.prefix import SplitPrefixModel, prefix_for

__all__ = ["METHOD", "SplitDecoder", "SplitEncoder", "SplitModel", "SplitPrefixModel", "cut_model"]


def build(backbone: nn.Module, cfg: MethodConfig, task: str, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The client half trains all its weights, LoRA on its layers or prefixes on its layers; the server half
    trains every weight. The cut is checked here, early."""
    for param in backbone.parameters():
        param.requires_grad_(True)
    split = cut_model(backbone, cfg.cut_layer, head_on_client=cfg.split_head == "client")
    if cfg.split_client == "full":
        return backbone
    # layers [K, N) and the head train fully, the head wherever it runs (U-shaped: on the client, beside the client
    # half's LoRA or prefixes; a randomly initialised classifier left frozen there would never learn)
    server_half = set(split.server_parameters()) | set(split.head_parameters())
    if cfg.split_client == "prefix":
        if cfg.prefix_projection:
            raise ConfigError("--prefix-projection: the client half of a split model trains raw prefixes only; "
                              "drop --prefix-projection or use --split-client lora")
        for name, param in backbone.named_parameters():
            param.requires_grad_(name in server_half)
        return SplitPrefixModel(backbone, cfg.cut_layer, prefix_for(backbone, cfg.cut_layer, cfg.num_virtual_tokens))
    lora = LoraConfig(task_type=peft_task_type(task), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, layers_to_transform=list(range(cfg.cut_layer)),
                      target_modules=list(cfg.lora_targets) if cfg.lora_targets else None)
    model = get_peft_model(backbone, lora)
    for name, param in model.get_base_model().named_parameters():
        if name in server_half:
            param.requires_grad_(True)
    return model


def save(model: nn.Module, out_dir: Path) -> None:
    """A whole Hugging Face model folder; client-half LoRA is merged into a copy of the weights, client-half
    prefixes are saved beside it (load with ``SplitPrefixModel.from_pretrained``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out_dir)


METHOD = register(Method("split", build, table_defaults("split"), protocol="split", save=save,
                         saves_whole_model=True,
                         description="Split-FedLLM: the client runs layers [0, K), the server the rest"))
