"""--device, --precision, --gradient-checkpointing and --load-in on a CPU machine (the GPU paths are exercised by
benchmarks/gpu/check.sh on a machine that has one)."""

from __future__ import annotations

import pytest
import torch

from fedcustom.cli import main
from fedcustom.device import resolve_device
from fedcustom.data.features import make_loader
from fedcustom.errors import ConfigError
from fedcustom.runner import build_job, execute
from fedcustom.training import LocalSchedule, train_local
from fedcustom.wire import schedule_from_config, schedule_to_config

NO_CUDA = not torch.cuda.is_available()


def test_cpu_and_auto_resolve_to_this_machines_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'tpu' is not a device; expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_and_quantized_loading_without_cuda_exit_2_with_the_reason(
        tiny_bert: str, toy_csv: str, tmp_path, capsys) -> None:
    base = ["run", "--model", tiny_bert, "--dataset", toy_csv, "--clients", "2", "--rounds", "1",
            "--output", str(tmp_path / "out"), "--quiet"]
    assert main([*base, "--device", "cuda"]) == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err
    assert main([*base, "--method", "lora", "--load-in", "4bit"]) == 2
    assert "bitsandbytes quantization runs on CUDA only" in capsys.readouterr().err


def test_settings_that_cannot_work_are_refused_before_anything_loads(tiny_bert: str, toy_csv: str, tmp_path,
                                                                     capsys) -> None:
    base = ["run", "--model", tiny_bert, "--dataset", toy_csv, "--output", str(tmp_path / "out"), "--quiet"]
    assert main([*base, "--method", "full", "--load-in", "8bit"]) == 2
    assert "a quantized backbone stays frozen" in capsys.readouterr().err
    assert main([*base, "--precision", "fp16", "--device", "cpu"]) == 2
    assert "fp16 autocast needs a GPU; on the CPU use --precision bf16" in capsys.readouterr().err


def test_a_bf16_autocast_run_on_the_cpu_learns_and_its_payloads_stay_fp32(tiny_config) -> None:
    # Prepare
    job = build_job(tiny_config(train__precision="bf16", train__device="cpu", method__name="lora", train__lr=5e-3,
                                federation__rounds=3))
    # Execute
    summary = execute(job)
    # Assert: it learned, every tensor that travels is fp32, and the summary says where it ran
    assert summary["final_accuracy"] >= summary["initial_accuracy"] + 0.1, summary["accuracy_per_round"]
    assert {t.dtype for t in job.server.global_state.values()} == {torch.float32}
    assert summary["device"] == "cpu" and summary["peak_rss_mb"] > 0
    import json

    log = [json.loads(line) for line in (job.out / "round_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(line["memory"]["peak_rss_mb"] > 0 for line in log)  # per round, round 0 included
    assert schedule_from_config(schedule_to_config(job.schedule, 0)).precision == "bf16"


def test_gradient_checkpointing_gives_the_same_losses(tiny_config) -> None:
    losses = []
    for checkpointing in (False, True):
        job = build_job(tiny_config(method__name="lora", train__gradient_checkpointing=checkpointing))
        layers = [m.gradient_checkpointing for m in job.model.get_base_model().modules()
                  if hasattr(m, "gradient_checkpointing")]
        assert layers and all(flag == checkpointing for flag in layers)  # the encoder recomputes, or does not
        table = job.data.client_table(0)
        result = train_local(job.model, table, job.tokenizer, LocalSchedule(lr=1e-2, batch_size=8, epochs=2), seed=3)
        losses.append(result.mean_loss)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_the_flowertune_general_nlp_config_is_the_documented_workload() -> None:
    from pathlib import Path

    from fedcustom.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "flowertune_general_nlp.toml"), {})
    assert (cfg.model.task, cfg.model.load_in, cfg.method.name, cfg.method.lora_r, cfg.method.lora_alpha) == \
        ("causal-lm", "4bit", "lora", 32, 64)
    assert (cfg.federation.clients, cfg.federation.fraction, cfg.train.device) == (20, 0.1, "cuda")


@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_gradient_checkpointing_trains_the_same_tensors_and_losses_for_prompt_tuning_and_lora(tiny_config,
                                                                                                method: str) -> None:
    # Prepare: one client batch through each model, checkpointing off and on
    results = []
    for checkpointing in (False, True):
        job = build_job(tiny_config(method__name=method, train__gradient_checkpointing=checkpointing))
        job.model.train()
        batch = next(iter(make_loader(job.data.client_table(0), job.tokenizer, 8, seed=0)))
        torch.manual_seed(0)
        loss = job.model(**batch).loss
        loss.backward()
        results.append((float(loss), sorted(n for n, p in job.model.named_parameters() if p.grad is not None)))
    # Assert: the same loss and the same trained tensors (the adapter's, not only the head's)
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
    assert results[1][1] == results[0][1] and any("lora" in n or "prompt_encoder" in n for n in results[0][1])


def test_gradient_checkpointing_is_refused_for_prefix_tuning(tiny_config) -> None:
    # a checkpointed layer drops the cache in training, and the prefix travels in it: it trained the head only
    with pytest.raises(ConfigError, match="--gradient-checkpointing with --method prefix"):
        build_job(tiny_config(method__name="prefix", train__gradient_checkpointing=True))
