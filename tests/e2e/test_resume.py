"""A real `fedcustom run` process is SIGKILLed in the middle of a round; `fedcustom run --resume`
then finishes it with the same final global state as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.integration


# What the server and clients must carry across the kill: central DP's accountant, or (DP and SCAFFOLD's clear-text
# control variates do not mix) a server optimizer's moments and every client's control variate.
STATEFUL = {  # (lines added to [federation], a [privacy] table)
    "dp": ("", '[privacy]\ndp = "central"\nclip_norm = 5.0\nnoise_multiplier = 0.3\nreproducible_noise = true\n'),
    "adam-scaffold": ('server_opt = "adam"\nserver_lr = 0.01\nscaffold = true\n', ""),
}


def write_config(path: Path, model: str, data: str, out: Path, stateful: str = "dp") -> Path:
    """Rounds long enough (~1-2 s) that a kill lands inside one; stateful codecs and server state on."""
    federation, privacy = STATEFUL[stateful]
    path.write_text(f"""
[model]
name = "{model}"
max_length = 16
[data]
dataset = "{data}"
partition = "iid"
max_eval_examples = 60
[method]
name = "prefix"
num_virtual_tokens = 4
[federation]
clients = 3
rounds = 3
local_epochs = 30
{federation}[codec]
up = "delta,topk:0.5"
{privacy}[train]
batch_size = 16
lr = 0.01
[output]
dir = "{out}"
quiet = true
""")
    return path


def fedcustom(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "fedcustom.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def checkpoint_round(out: Path) -> int | None:
    path = out / "checkpoint.safetensors"
    if not path.exists():
        return None
    with safe_open(path, "pt") as fh:  # the file is replaced by rename, so a reader sees a whole one
        return json.loads(fh.metadata()["fedcustom"])["round"]


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


@pytest.mark.parametrize("stateful", list(STATEFUL))
def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(tmp_path: Path, tiny_bert: str, toy_csv: str,
                                                                     stateful: str) -> None:
    # Prepare: the reference run, never interrupted
    whole = tmp_path / "whole"
    finish(fedcustom("run", "--config", str(write_config(tmp_path / "whole.toml", tiny_bert, toy_csv, whole, stateful))))
    cut = tmp_path / "cut"
    proc = fedcustom("run", "--config", str(write_config(tmp_path / "cut.toml", tiny_bert, toy_csv, cut, stateful)))
    # Execute: SIGKILL once round 1 is checkpointed, while round 2 trains
    try:
        deadline = time.monotonic() + 240
        while checkpoint_round(cut) != 1:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_round(cut) == 1, "the kill came after round 2 ended; make the rounds longer"
    assert not (cut / "adapter").exists()
    finish(fedcustom("run", "--resume", str(cut)))
    # Assert: bit-identical final adapter; the same round log apart from wall times
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(out: Path) -> list[dict]:
        lines = [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k not in ("wall_seconds", "memory")} for line in lines]

    assert log(cut) == log(whole)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["rounds"] == 3
    # the summary says where the run was cut off (its wall time lacks the lost part of round 2); the whole run's not
    assert summary["resumed_after_rounds"] == [1]
    assert json.loads((whole / "summary.json").read_text())["resumed_after_rounds"] == []
    assert "resumed after round 1" in (cut / "report.md").read_text()
    assert summary["epsilon"] > 0 if stateful == "dp" else summary["settings"]["scaffold"]
    assert checkpoint_round(cut) is None and checkpoint_round(whole) is None  # deleted once a run has finished


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    proc = fedcustom("run", "--resume", str(tmp_path), "--rounds", "9")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "keeps the config it was started with; drop federation.rounds" in output


def test_a_flower_sim_run_is_refused_by_run_resume_with_what_to_do(tmp_path: Path, monkeypatch) -> None:
    # its clients lived in Flower's simulation; rebuilding them embedded failed with a parts mismatch
    import fedcustom.runner as runner
    from fedcustom.config import build_config
    from fedcustom.errors import FedCustomError

    monkeypatch.setattr(runner, "load_checkpoint", lambda out: object())
    monkeypatch.setattr(runner, "resumed_config", lambda out, checkpoint: build_config(
        {"federation": {"runtime": "flower-sim"}}))
    with pytest.raises(FedCustomError, match="a --runtime flower-sim run; `fedcustom run --resume` continues embedded"):
        runner.resumed_job(tmp_path)
