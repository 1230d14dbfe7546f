"""The Ray resources flower-sim asks for: a GPU run's actor must be given the GPUs, or Ray hides them from it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedcustom[flower]'")

from fedcustom.deploy.flower.sim import backend_config  # noqa: E402


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with two CUDA devices, as torch reports it (this one has none; the GPU run itself is a device check)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:1"])
def test_a_cuda_run_gives_the_clients_actor_every_gpu(two_gpus: None, device: str) -> None:
    config = backend_config(device, 4.0)
    assert config["client_resources"] == {"num_cpus": 4.0, "num_gpus": 2.0}
    assert config["init_args"] == {"num_cpus": 4, "num_gpus": 2}


def test_a_cpu_run_asks_for_no_gpu(two_gpus: None) -> None:
    assert backend_config("cpu", 2.0)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}


def test_without_cuda_auto_asks_for_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_config("auto", 2.0)["client_resources"]["num_gpus"] == 0.0
