"""Client profiles (issue 21, item 5): each simulated client's device time is its measured training time over its
compute speed plus its bytes over its bandwidth; a client slower than the deadline is a straggler left out of the
round; a profile can set the client's LoRA rank; the summary reports the time to a target accuracy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fedcustom.assemble import check_runtime_support
from fedcustom.config import ConfigError
from fedcustom.runner import build_job, execute

from conftest import TINY_LR


def _profiles(tmp_path: Path, text: str, name: str = "devices.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run_with_spy(cfg):
    job = build_job(cfg)
    client, replies = job.server.runtime.local_handler, []
    train = client.train

    def spy(node, message):
        reply = train(node, message)
        replies.append((node, message, reply))
        return reply

    client.train = spy
    return job, execute(job), replies


def test_a_slow_device_is_a_straggler_and_the_round_lasts_until_the_deadline(tiny_config, tmp_path: Path) -> None:
    # Prepare: three clients on a server, a phone on a slow link, and a board a million times slower
    path = _profiles(tmp_path, "name,compute,bandwidth_mb_s\nserver,1,\nphone,0.5,0.01\nboard,0.000001,1\n")
    cfg = tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=3,
                      federation__client_profiles=path, federation__round_timeout=60.0,
                      federation__target_accuracy=0.0)
    # Execute
    job, summary, replies = _run_with_spy(cfg)
    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    # Assert: the board trains but its update arrives after the deadline, every round
    for record in log[1:]:
        assert set(record["rejected"]) == {"2"} and "straggler" in record["rejected"]["2"]
        assert record["simulated_seconds"] == 60.0
    # the phone's time is its training time / 0.5 plus its bytes at 10 kB/s
    phone = [(m, r) for node, m, r in replies if node == 1]
    moved = len(phone[-1][0].payload) + len(phone[-1][1].payload)
    assert phone[-1][1].metrics["simulated_seconds"] == pytest.approx(
        phone[-1][1].metrics["train_seconds"] / 0.5 + moved / 1e4)
    assert summary["simulated_seconds_total"] == 60.0 * len(log[1:])
    target = summary["time_to_target"]
    assert target["round"] == 1 and target["simulated_seconds"] == 60.0 and target["wall_seconds"] > 0
    # the run's report states them
    from fedcustom.run_report import write_report

    write_report(job.out)
    report = (job.out / "report.md").read_text()
    assert "| simulated device time (s) | 120.0 |" in report and "| accuracy >= 0.0 | round 1," in report


def test_profiles_set_each_clients_lora_rank(tiny_config, tmp_path: Path) -> None:
    # Prepare: two device classes in TOML with their own ranks on a rank-4 adapter
    path = _profiles(tmp_path, "[[client]]\nname = 'iot'\nlora_rank = 1\n[[client]]\nname = 'server'\nlora_rank = 4\n",
                     "devices.toml")
    cfg = tiny_config(method__name="lora", method__lora_r=4, train__lr=TINY_LR["lora"], federation__rounds=1,
                      federation__client_profiles=path, federation__target_accuracy=1.0)
    # Execute
    job, summary, replies = _run_with_spy(cfg)
    # Assert: the iot client's update has rank 1; a target never reached has no round
    states = {node: job.server.codec.decode(reply.payload) for node, _, reply in replies}
    a_names = [n for n in states[0] if "lora_A" in n]
    assert a_names and all(torch.count_nonzero(states[0][n][1:]) == 0 for n in a_names)
    assert all(torch.count_nonzero(states[1][n][1:]) > 0 for n in a_names)
    assert max(summary["accuracy_per_round"]) < 1.0  # (one round of a tiny random model)
    assert summary["time_to_target"]["round"] is None and "simulated_seconds_total" in summary


@pytest.mark.parametrize("profiles, overrides, expected", [
    ("compute\n1\n", {"federation__runtime": "flower-sim"}, "--client-profiles with --runtime flower-sim"),
    (None, {}, "no such file"),
    ("speed\n1\n", {}, "unknown column(s) speed"),
    ("compute\n0\n", {}, "compute must be a finite number > 0"),
    ("compute\nfast\n", {}, "compute, bandwidth_mb_s and memory_mb are numbers"),
    ("lora_rank\n2\n", {"method__name": "prefix"}, "lora_rank needs --method lora"),
    ("lora_rank\n2\n", {"method__name": "lora", "method__lora_ranks": "2"}, "keep one"),
    ("lora_rank\n2\n\n", {"method__name": "lora", "method__lora_r": 1}, "lora_rank [2]; each rank must be between 1"),
])
def test_bad_profiles_are_one_clear_error(tiny_config, tmp_path: Path, profiles: str | None, overrides: dict,
                                          expected: str) -> None:
    path = _profiles(tmp_path, profiles) if profiles is not None else str(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_runtime_support(tiny_config(federation__client_profiles=path, **overrides))
