"""fedcustom on a real Flower deployment: a SuperLink and two SuperNodes as processes on 127.0.0.1,
talking HTTP(S) as across machines, each node training on its OWN data file (node config), the run
submitted with `fedcustom submit`. Slow where a fresh ClientApp process handles each message (Flower's default:
10-20 s a message here), so few rounds; the tests that are not about that path run their nodes with workers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedcustom.cli import main

flower = pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")
from flower_cluster import Cluster, make_certs, make_node_keypair  # noqa: E402 - needs Flower's cryptography

pytestmark = pytest.mark.integration


def _node_files(toy_csv: str, root: Path) -> list[Path]:
    """Each data owner's own rows: the toy set split in two files (the server never sees them)."""
    rows = pd.read_csv(toy_csv)
    paths = []
    for i in range(2):
        path = root / f"owner{i}.csv"
        rows.iloc[i::2].iloc[:60].to_csv(path, index=False)
        paths.append(path)
    return paths


def _submit(cluster: Cluster, tiny_bert: str, toy_csv: str, out: Path, *extra: str) -> int:
    trust = ["--root-certificates", str(cluster.certs["ca_cert"])] if cluster.certs else ["--insecure"]
    return main(["submit", "--superlink", cluster.address, *trust, "--model", tiny_bert, "--max-length", "16",
                 "--dataset", toy_csv, "--max-eval-examples", "40", "--method", "prefix", "--num-virtual-tokens", "4",
                 "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--batch-size", "16", "--lr", "0.01",
                 "--output", str(out), "--quiet", *extra])


def _start_two_owners(cluster: Cluster, files: list[Path], workers: bool = False) -> None:
    """An insecure SuperLink and two SuperNodes, each with its own data file; with ``workers``, each node's tasks
    run in a persistent ``fedcustom worker`` (which still takes and returns the node's context.state with every
    task) instead of a fresh ClientApp process per message."""
    cluster.start_superlink()
    configs = {f"owner{i}": f"partition-id={i} data-path='{files[i]}'" for i in range(2)}
    if workers:
        cluster.start_worker_nodes(configs)
        return
    for name, node_config in configs.items():
        cluster.start_supernode(name, node_config)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]


# TLS with node authentication only: every other deploy test runs over --insecure (the same job there cost a minute)
@pytest.mark.parametrize("secure", [True], ids=["tls-and-node-auth"])
def test_two_supernodes_with_their_own_data_train_and_the_server_saves_the_adapter(
        secure: bool, tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: TLS certificates and registered node keys in the secure variant
    files = _node_files(toy_csv, tmp_path)
    certs = make_certs(tmp_path / "certs") if secure else None
    keys = [make_node_keypair(tmp_path / "keys", f"owner{i}") for i in range(2)] if secure else [None, None]
    out = tmp_path / "out"
    with Cluster(tmp_path, certs, node_auth=secure) as cluster:
        cluster.start_superlink()
        for i, key in enumerate(keys):
            if key:
                cluster.register(key["public"])
            # the plain flower-supernode, as Flower documents it (every other test polls faster)
            cluster.start_supernode(f"owner{i}", f"partition-id={i} data-path='{files[i]}'",
                                    key["private"] if key else None, poll=None)
        # Execute: with stateful codecs both ways: round 2's differences are against the state each node
        # reconstructed in round 1, which a fresh ClientApp process holds only through context.state (without it,
        # the node would reject round 2)
        code = _submit(cluster, tiny_bert, toy_csv, out, "--codec", "delta,topk:0.5,zstd", "--codec-down",
                       "delta,zstd")
    # Assert: the run completed, both owners trained on their own 60 rows each round, the loss fell
    assert code == 0
    log = _log(out)
    assert [r["round"] for r in log] == [0, 1, 2]
    assert all(r["clients"] == [0, 1] and r["rejected"] == {} and r["examples_seen"] == 120 for r in log[1:])
    assert all(r["bytes_up"]["0"] > 0 for r in log[1:])
    assert log[2]["eval_loss"] < log[0]["eval_loss"]
    # Assert: the final adapter is saved in PEFT format, with the prefixes the run trained
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("prompt_embeddings" in k for k in adapter) and all(torch.isfinite(t).all() for t in adapter.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    # Assert: the client statistics are the owners' own files (60 rows each, as they described them)
    owners = [[int((pd.read_csv(f)["label"] == label).sum()) for label in (0, 1)] for f in files]  # [60, 0], [0, 60]
    assert summary["client_data"] == [{"client": i, "examples": 60, "label_histogram": owners[i]} for i in range(2)]


def test_split_learning_runs_across_supernodes_that_start_a_process_per_message(tmp_path: Path, tiny_bert: str,
                                                                                toy_csv: str) -> None:
    """U-shaped SplitFed: per batch, activations up, the server's hidden states down, the head's gradient up, the
    cut's gradient down, each a message to a fresh ClientApp process that resumes the node's session from
    context.state (and recomputes the batch's forward before back-propagating). One owner: the server serves its
    clients' batches one after another, so a second owner only doubles the processes (several owners' sessions are
    tested on Flower's simulation in test_flower_runtime.py)."""
    out = tmp_path / "out"
    rows = _node_files(toy_csv, tmp_path)[0]
    with Cluster(tmp_path) as cluster:
        cluster.start_superlink()
        cluster.start_supernode("owner0", f"partition-id=0 data-path='{rows}'")
        code = _submit(cluster, tiny_bert, toy_csv, out, "--method", "split", "--cut-layer", "1", "--split-head",
                       "client", "--clients", "1", "--rounds", "1", "--local-steps", "1", "--lr", "0.003")
    assert code == 0
    log = _log(out)
    assert [r["round"] for r in log] == [0, 1]
    assert log[1]["clients"] == [0] and log[1]["rejected"] == {}
    assert log[1]["examples_seen"] == 16  # one batch of 16
    assert log[1]["client_flops"]["0"] > 0 and log[1]["bytes_up"]["0"] > 0 and log[1]["bytes_down"]["0"] > 0
    assert log[1]["eval_loss"] != log[0]["eval_loss"]
    assert (out / "model" / "model.safetensors").is_file()


def test_secure_aggregation_on_a_superlink_is_flowers_secaggplus(tmp_path: Path, tiny_bert: str,
                                                                  toy_csv: str) -> None:
    """--secagg on a SuperLink: Flower's SecAgg+ workflow on the server and its mod on each node, whose keys and
    shares live in context.state across the four stages' tasks (run by workers: each task's context comes from the
    SuperNode and goes back to it, as with a fresh ClientApp process per message, at a fraction of the time)."""
    out = tmp_path / "out"
    with Cluster(tmp_path) as cluster:
        _start_two_owners(cluster, _node_files(toy_csv, tmp_path), workers=True)
        code = _submit(cluster, tiny_bert, toy_csv, out, "--secagg", "--rounds", "1")
    assert code == 0
    log = _log(out)
    assert [r["round"] for r in log] == [0, 1]
    assert log[1]["clients"] == [0, 1] and log[1]["rejected"] == {} and log[1]["examples_seen"] == 120
    assert log[1]["eval_loss"] < log[0]["eval_loss"]
    assert json.loads((out / "summary.json").read_text())["secagg_protocol"] == "flower-secaggplus"


def test_an_unregistered_supernode_is_refused(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    rogue = make_node_keypair(tmp_path / "keys", "rogue")
    with Cluster(tmp_path, certs, node_auth=True) as cluster:
        cluster.start_superlink()
        with pytest.raises(RuntimeError, match=r"exited with 1"):
            cluster.start_supernode("rogue", "partition-id=0", rogue["private"], poll=None)
        assert "Failed to activate SuperNode" in cluster.log("rogue")


def test_an_unreachable_superlink_is_a_clear_error(tmp_path: Path, tiny_bert: str, toy_csv: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    from flower_cluster import free_port

    code = main(["submit", "--superlink", f"127.0.0.1:{free_port()}", "--insecure", "--model", tiny_bert,
                 "--dataset", toy_csv, "--output", str(tmp_path / "out")])
    assert code == 2
    assert "could not submit to the SuperLink at 127.0.0.1:" in capsys.readouterr().err


def test_full_fine_tuning_of_packaged_smollm2_round_trips_through_a_superlink(tmp_path: Path, toy_csv: str) -> None:
    """About 540 MB of fp32 weights down to a SuperNode and back (payloads as chunked ArrayRecords)."""
    from fedcustom.models import resolve_model

    # Prepare: convert the packaged GGUF once here, so the server and the node only read the cache
    backbone = resolve_model("smollm2")
    rows = tmp_path / "owner0.csv"
    pd.read_csv(toy_csv).iloc[:8].to_csv(rows, index=False)
    out = tmp_path / "out"
    with Cluster(tmp_path) as cluster:
        cluster.start_superlink()
        cluster.start_worker_node("owner0", f"partition-id=0 data-path='{rows}'")  # SmolLM2 loads once, not per message
        # Execute: one round, one optimizer step of full fine-tuning
        code = main(["submit", "--superlink", cluster.address, "--insecure", "--model", "smollm2", "--method", "full",
                     "--dataset", toy_csv, "--max-train-examples", "8", "--max-eval-examples", "8", "--max-length",
                     "16", "--clients", "1", "--rounds", "1", "--local-steps", "1", "--batch-size", "4", "--lr", "1e-5",
                     "--no-count-flops", "--round-timeout", "900", "--output", str(out), "--quiet"])
    # Assert: the whole model went both ways, was accepted, and the saved model changed and stays finite
    assert code == 0
    log = _log(out)
    assert log[1]["rejected"] == {} and log[1]["clients"] == [0]
    assert log[1]["bytes_up"]["0"] > 500e6 and log[1]["bytes_down"]["0"] > 500e6
    trained = load_file(str(out / "model" / "model.safetensors"))
    initial = load_file(str(Path(backbone) / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.isfinite(trained[name]).all() and not torch.equal(trained[name], initial[name])


def test_each_supernode_scores_the_global_and_its_own_model_on_rows_it_holds_out(tmp_path: Path, tiny_bert: str,
                                                                                toy_csv: str) -> None:
    """Per-client evaluation in a deployment: each owner holds out a quarter of its own file (15 of its 60 rows),
    trains on the rest, keeps a private head (--personalize head) in its node state, scores both models on its
    held-out rows and at the end saves its own model in its own folder; the server only gets the scores."""
    out, files = tmp_path / "out", _node_files(toy_csv, tmp_path)
    with Cluster(tmp_path) as cluster:
        cluster.start_superlink()
        cluster.start_worker_nodes({f"owner{i}": f"partition-id={i} data-path='{files[i]}' "
                                                 f"output-dir='{tmp_path / f'owner{i}'}'" for i in range(2)})
        code = _submit(cluster, tiny_bert, toy_csv, out, "--personalize", "head", "--client-eval-fraction", "0.25")
    assert code == 0
    for i in range(2):  # each owner's own adapter, with its private head, in its own folder (none on the server)
        own = load_file(str(tmp_path / f"owner{i}" / "clients" / str(i) / "adapter" / "adapter_model.safetensors"))
        assert any("classifier" in name for name in own)
    assert not (out / "clients").exists()
    log = _log(out)
    assert all(r["rejected"] == {} and r["examples_seen"] == 90 for r in log[1:])  # 45 training rows per owner
    for record in log:
        for key in ("client_eval", "client_eval_personal"):
            assert set(record[key]) == {"0", "1"}
            assert all(abs(15 * score - round(15 * score)) < 1e-9 for score in record[key].values())  # k of 15 rows
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["client_accuracy_personal"]) == {"0", "1"} and "client_accuracy_worst10" in summary
