"""The persistent per-node worker on a real SuperLink (issue 20): SuperNodes started with ``fedcustom supernode
--isolation process`` and a ``fedcustom worker`` each, as processes on 127.0.0.1 talking HTTP as across machines.
The model stays loaded in the worker between messages; the results equal the embedded runtime's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cut_off_in_round
from fedcustom.cli import main

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from flower_cluster import Cluster  # noqa: E402 - needs Flower's cryptography

pytestmark = pytest.mark.integration

JOB = ["--max-length", "16", "--max-eval-examples", "40", "--method", "lora", "--clients", "2", "--local-epochs", "1",
       "--batch-size", "16", "--lr", "0.003", "--partition", "iid", "--quiet", "--no-report"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]


def _embedded(tmp_path: Path, tiny_bert: str, toy_csv: str, rounds: int) -> Path:
    """The same job in one process: what a deployment must reproduce."""
    embedded = tmp_path / "embedded"
    assert main(["run", "--model", tiny_bert, "--dataset", toy_csv, *JOB, "--rounds", str(rounds),
                 "--output", str(embedded)]) == 0
    return embedded


def _start_two_worker_nodes(cluster: Cluster) -> None:
    """A SuperLink and two nodes, each with a worker, each taking its partition of the run's dataset."""
    cluster.start_superlink()
    cluster.start_worker_nodes({f"owner{i}": f"partition-id={i}" for i in range(2)})


def _assert_same_adapter(out: Path, embedded: Path) -> None:
    adapters = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, embedded)]
    for name, tensor in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], tensor, rtol=0, atol=1e-6)


def _assert_same_rounds(out: Path, embedded: Path) -> None:
    """Every round had both clients, and the same bytes and losses as in one process (1e-6)."""
    ours, reference = _log(out), _log(embedded)
    assert all(r["rejected"] == {} and r["clients"] == [0, 1] for r in ours[1:])
    assert [r["bytes_up"] for r in ours] == [r["bytes_up"] for r in reference]
    assert [r["train_loss"] for r in ours] == pytest.approx([r["train_loss"] for r in reference], abs=1e-6)
    assert [r["eval_loss"] for r in ours] == pytest.approx([r["eval_loss"] for r in reference], abs=1e-6)


def _submit(cluster: Cluster, tiny_bert: str, toy_csv: str, out: Path, *extra: str) -> int:
    return main(["submit", "--superlink", cluster.address, "--insecure", "--model", tiny_bert, "--dataset", toy_csv,
                 *JOB, "--output", str(out), *extra])


def test_workers_give_the_embedded_runtimes_results(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: the same job embedded, and on a SuperLink whose two nodes each run a worker (each node takes its
    # partition of the run's dataset, as the embedded clients do)
    embedded = _embedded(tmp_path, tiny_bert, toy_csv, 3)
    out = tmp_path / "out"
    with Cluster(tmp_path) as cluster:
        _start_two_worker_nodes(cluster)
        # Execute
        code = _submit(cluster, tiny_bert, toy_csv, out, "--rounds", "3")
        worker_log = cluster.log("owner0-worker")
    # Assert: the same losses, bytes and adapter as in one process (1e-6), and every message ran in the worker
    assert code == 0
    _assert_same_rounds(out, embedded)
    _assert_same_adapter(out, embedded)
    assert "task failed" not in worker_log


def test_a_worker_refuses_a_run_it_was_not_started_for(tmp_path: Path, tiny_bert: str, toy_csv: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    with Cluster(tmp_path) as cluster:
        cluster.start_superlink()
        cluster.start_worker_node("owner0", "partition-id=0")
        cluster.start_worker_node("owner1", "partition-id=1", worker_args=("--run", "1"))  # not the run we submit
        # Execute
        code = _submit(cluster, tiny_bert, toy_csv, out, "--rounds", "1", "--round-timeout", "30")
        refused = cluster.log("owner1-worker")
    # Assert: node 1 answered the run's first message (which client are you?) with an error, so the run, which
    # needs both clients, stopped with the reason instead of training without it
    assert code == 2
    assert "only 1 SuperNodes answered" in capsys.readouterr().err
    assert "this fedcustom worker serves run 1, not run" in refused


def test_a_deployment_whose_serverapp_is_killed_resumes_from_its_checkpoint(
        tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: the uninterrupted run, embedded (a stateless LoRA job: nodes keep nothing between rounds)
    embedded = _embedded(tmp_path, tiny_bert, toy_csv, 4)
    out = tmp_path / "out"
    with Cluster(tmp_path) as cluster:
        _start_two_worker_nodes(cluster)
        # Execute: submit, SIGKILL the ServerApp mid-round 3 (a node has its message), then `submit --resume` on the
        # same SuperLink. A node that pulls its round-3 message as the run stops keeps an orphan task (Flower 1.41);
        # the worker must still serve the resumed run.
        assert _submit(cluster, tiny_bert, toy_csv, out, "--rounds", "4", "--no-wait") == 0
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "ROUND 3]" not in cluster.log("owner0") + cluster.log("owner1"):
            time.sleep(0.05)
        killed = cluster.kill_serverapps()
        interrupted = len(_log(out))
        code = main(["submit", "--resume", str(out), "--superlink", cluster.address, "--insecure"])
    # Assert: the resumed run logged every round once and ends where the uninterrupted run ends (1e-6)
    assert killed == 1 and interrupted < 5 and code == 0
    ours, reference = _log(out), _log(embedded)
    assert [r["round"] for r in ours] == [0, 1, 2, 3, 4]
    assert [r["train_loss"] for r in ours] == pytest.approx([r["train_loss"] for r in reference], abs=1e-6)
    _assert_same_adapter(out, embedded)


def test_resuming_a_deployment_whose_nodes_kept_state_is_refused(tmp_path: Path, tiny_bert: str, toy_csv: str,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a SCAFFOLD run cut off after round 1 (its checkpoint stays; a finished run deletes its own)
    cut_off_in_round(monkeypatch, 2)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["run", "--model", tiny_bert, "--dataset", toy_csv, *JOB, "--rounds", "2", "--scaffold",
              "--output", str(out)])
    assert (out / "checkpoint.safetensors").is_file()
    capsys.readouterr()
    assert main(["submit", "--resume", str(out), "--superlink", "127.0.0.1:1", "--insecure"]) == 2
    assert "--scaffold (each node's control variate)" in capsys.readouterr().err


def test_ping_times_a_no_op_message_to_every_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a SuperLink and two worker nodes
    with Cluster(tmp_path / "cluster") as cluster:
        _start_two_worker_nodes(cluster)
        # Execute: five no-op round trips to each node
        assert main(["ping", "--superlink", cluster.address, "--insecure", "--clients", "2", "--messages", "5",
                     "--output", str(tmp_path / "ping")]) == 0
    # Assert: every round has both nodes' round trips; the summary leaves out the first round (start-up)
    result = json.loads((tmp_path / "ping" / "ping.json").read_text())
    assert [sorted(row) for row in result["samples"]] == [["0", "1"]] * 5
    assert all(0 < seconds < 60 for row in result["samples"] for seconds in row.values())
    steady = sorted(s for row in result["samples"][1:] for s in row.values())
    assert result["summary"]["messages"] == 8 and result["summary"]["max_s"] == steady[-1]
    assert "round trips, median" in capsys.readouterr().out


def test_split_learning_through_workers_keeps_the_session_in_memory_and_gives_the_embedded_results(
        tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: U-shaped split learning embedded, and on two worker nodes (each message of a batch to a worker that
    # keeps the session in memory; the context gets the node's state only between rounds)
    split = ["--method", "split", "--cut-layer", "1", "--split-head", "client", "--local-steps", "2", "--rounds", "2"]
    embedded = tmp_path / "embedded"
    assert main(["run", "--model", tiny_bert, "--dataset", toy_csv, *JOB, *split, "--output", str(embedded)]) == 0
    out = tmp_path / "out"
    with Cluster(tmp_path / "cluster") as cluster:
        _start_two_worker_nodes(cluster)
        # Execute
        code = _submit(cluster, tiny_bert, toy_csv, out, *split)
    # Assert: the same losses and bytes as in one process
    assert code == 0
    _assert_same_rounds(out, embedded)
