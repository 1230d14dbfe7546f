"""A saved adapter names a packaged base model by its Hugging Face Hub id, not by a path on the machine that saved
it; fedcustom's loaders map the Hub id back to the packaged copy the adapter was trained on."""

from __future__ import annotations

import json
from pathlib import Path

from fedcustom.models import make_portable, packaged_alias, resolve_model


def _adapter(folder: Path, base: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    (folder / "README.md").write_text(f"---\nbase_model: {base}\nlibrary_name: peft\n---\n")
    return folder


def test_a_packaged_base_is_renamed_to_its_hub_id_in_every_adapter_config_and_card(tmp_path: Path) -> None:
    # Prepare: a global adapter and a personal one inside it (dual-lora), both on the packaged MiniLM's folder
    local = resolve_model("minilm")
    outer = _adapter(tmp_path / "adapter", local)
    inner = _adapter(outer / "personal", local)
    # Execute
    make_portable(outer)
    # Assert
    for folder in (outer, inner):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config == {"peft_type": "LORA", "base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}
        assert local not in (folder / "README.md").read_text()
        assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (folder / "README.md").read_text()


def test_any_other_base_is_left_as_saved(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "adapter", str(tmp_path / "my-own-model"))
    before = (folder / "adapter_config.json").read_text()
    make_portable(folder)
    assert (folder / "adapter_config.json").read_text() == before


def test_the_hub_ids_map_back_to_the_packaged_aliases() -> None:
    assert packaged_alias("sentence-transformers/all-MiniLM-L6-v2") == "minilm"
    assert packaged_alias("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2"
    assert packaged_alias("bert-base-uncased") is None


def test_saved_weights_get_the_umasks_permissions_not_safetensors_private_ones(tmp_path: Path) -> None:
    # Prepare: a weights file as the safetensors library writes it (0600 whatever the umask)
    import os

    import torch
    from safetensors.torch import save_file

    from fedcustom.packaged import umask_permissions

    previous = os.umask(0o022)
    try:
        save_file({"w": torch.ones(2)}, str(tmp_path / "adapter_model.safetensors"))
        assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600
        # Execute
        umask_permissions(tmp_path)
    finally:
        os.umask(previous)
    # Assert
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
