"""One writer for every saved model folder (the global model and each client's own), so they cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedcustom.config import RunConfig
from fedcustom.methods import save_trained
from fedcustom.methods.lora_stack import save_merged, stacks
from fedcustom.models import make_portable
from fedcustom.packaged import umask_permissions
from fedcustom.tasks import get_task


def write_model_folder(cfg: RunConfig, method: Any, model: torch.nn.Module, tokenizer: Any, folder: Path,
                       adapters: list[str] | None = None) -> None:
    """``model`` as it is now, in ``folder``: the method's format (a PEFT adapter for adapter methods; only
    ``adapters`` where given: dual-lora's global folder holds the global adapter alone; a whole merged model where
    LoRA stacks into the backbone) with its tokenizer or image processor (loading a folder without one does not
    fail, it gives a tokenizer that maps every word to [UNK]) and the task's description (class names); the base
    model named portably (its Hub id, not a path on this machine) and files readable as the umask allows."""
    if adapters is not None:
        model.save_pretrained(folder, selected_adapters=adapters)
    elif stacks(cfg):  # the federated training lives in the backbone (the adapter restarts each round)
        save_merged(model, folder)
    else:
        (method.save or save_trained)(model, folder)
    tokenizer.save_pretrained(folder)
    get_task(cfg.model.task).describe_saved(model, folder)
    make_portable(folder)
    umask_permissions(folder)
