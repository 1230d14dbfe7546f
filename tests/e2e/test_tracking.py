"""--tracker tensorboard / mlflow: what a run logs, read back through each library's own API."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_LR
from fedcustom.config import build_config
from fedcustom.errors import ConfigError
from fedcustom.runner import build_job, execute


def _records(job) -> list[dict]:
    return [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]


def test_both_trackers_log_every_round_the_config_and_the_adapter(tiny_config) -> None:
    import mlflow  # the tracking extra, which make setup installs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare / Execute
    job = build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], federation__clients=3,
                                federation__client_eval_fraction=0.3, output__trackers=("tensorboard", "mlflow")))
    summary = execute(job)
    records = _records(job)
    # Assert: TensorBoard scalars per round, global and per client, equal the round log
    events = EventAccumulator(str(job.out / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("eval_accuracy")
    assert [e.step for e in accuracy] == [r["round"] for r in records]
    assert [e.value for e in accuracy] == pytest.approx([r["eval_accuracy"] for r in records], rel=1e-6)
    client = next(iter(records[1]["bytes_up"]))
    assert events.Scalars(f"client_{client}/bytes_up")[0].value == pytest.approx(records[1]["bytes_up"][client])
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]
    # ... and the per-client evaluation: each client's held-out score and their mean per round
    assert [e.value for e in events.Scalars("client_eval_mean")] == pytest.approx(
        [r["client_eval_mean"] for r in records if "client_eval_mean" in r], rel=1e-6)
    assert events.Scalars(f"client_{client}/client_eval")[-1].value == pytest.approx(records[-1]["client_eval"][client])
    # Assert: MLflow has the config as parameters, the metric history, the final figures and the adapter
    from fedcustom.tracking import local_store

    client_api = mlflow.tracking.MlflowClient(tracking_uri=local_store(job.out))
    (run,) = client_api.search_runs([client_api.get_experiment_by_name("fedcustom").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "lora" and run.data.params["federation.clients"] == "3"
    history = client_api.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [(m.step, m.value) for m in history] == [(r["round"], pytest.approx(r["eval_accuracy"])) for r in records]
    assert run.data.metrics["final_accuracy"] == pytest.approx(summary["final_accuracy"])
    assert run.data.metrics["client_accuracy_worst10"] == pytest.approx(summary["client_accuracy_worst10"])
    artifacts = {a.path for a in client_api.list_artifacts(run.info.run_id)}
    assert {"adapter", "summary.json"} <= artifacts
    assert {a.path for a in client_api.list_artifacts(run.info.run_id, "adapter")} >= {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="--tracker mlflow needs the mlflow package: pip install mlflow-skinny"):
        build_config({"output": {"trackers": "tensorboard,mlflow"}})


def test_an_unknown_tracker_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--tracker.*wandb"):
        build_config({"output": {"trackers": "tensorboard,wandb"}})
