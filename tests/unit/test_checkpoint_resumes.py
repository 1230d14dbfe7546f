"""A checkpoint remembers every round after which its run was cut off and resumed, so the summary can say which
part of its wall time is missing; checkpoints written before it kept that still load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedcustom.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedcustom.runner import resumed_after


class Part:
    """The smallest Checkpointable: one tensor, no metadata."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"w": torch.ones(2)}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass


def test_each_resume_adds_its_round_and_a_run_never_cut_off_has_none(tmp_path: Path) -> None:
    # Prepare: a run cut off after round 2, resumed, checkpointed again after round 4
    assert resumed_after(None) == []
    save_checkpoint(tmp_path, 2, {}, [], 10.0, {"server": Part()})
    first = load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 4, {}, [], 20.0, {"server": Part()}, resumed_after(first))
    # Execute: cut off again and resumed
    second = load_checkpoint(tmp_path)
    # Assert
    assert first.resumed_after == [] and second.resumed_after == [2]
    assert resumed_after(second) == [2, 4]


def test_a_checkpoint_without_the_record_loads_as_never_resumed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {}, [], 5.0, {"server": Part()})
    path = tmp_path / CHECKPOINT
    with safe_open(path, "pt") as fh:
        meta = json.loads(fh.metadata()["fedcustom"])
    del meta["resumed_after"]  # as written before the record existed
    save_file(load_file(path), path, metadata={"fedcustom": json.dumps(meta)})
    assert load_checkpoint(tmp_path).resumed_after == []
