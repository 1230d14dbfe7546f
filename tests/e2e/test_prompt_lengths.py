"""Per-client prompt and prefix lengths (issue 21, items 3 and 4): a client of length L runs with its first L virtual
tokens only, sends the others back as it received them, and the server averages each token over the clients that
hold it; ``adaptive`` takes each device's length from its profile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fedcustom.config import ConfigError
from fedcustom.methods.prompt_capacity import ClientLengths, adaptive_lengths, lengths_for
from fedcustom.runner import build_job, execute
from fedcustom.strategies.fedavg import weighted_average

from conftest import TINY_LR


def _run(tiny_config, method: str = "prefix", **overrides) -> tuple[object, dict, list]:
    """A 2-client, 1-round run of 4 virtual tokens; returns the job, the initial global state and every upload."""
    job = build_job(tiny_config(method__name=method, train__lr=TINY_LR[method], federation__rounds=1, **overrides))
    initial = {k: v.clone() for k, v in job.server.global_state.items()}
    client, uploads = job.server.runtime.local_handler, []
    train = client.train

    def spy(node, message):
        reply = train(node, message)
        uploads.append((node, job.server.codec.decode(reply.payload), reply.num_examples))
        return reply

    client.train = spy
    execute(job)
    return job, initial, uploads


def _prompt_tensor(state: dict) -> str:
    (name,) = [n for n in state if "prompt_encoder" in n]
    return name


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_client_of_length_l_runs_with_its_first_l_tokens(tiny_config, method: str) -> None:
    # Prepare: lengths 2 and 4 on a 4-token adapter; a batch of the toy rows
    job = build_job(tiny_config(method__name=method, method__prefix_lengths="2,4"))
    client = job.server.runtime.local_handler
    assert isinstance(client.capacity, ClientLengths)
    state = dict(job.server.global_state)
    name = _prompt_tensor(state)
    batch = job.tokenizer(["good great film", "bad awful plot"], return_tensors="pt", padding=True)
    job.model.eval()

    def logits(node, values) -> torch.Tensor:
        client.load(node, values)
        with torch.no_grad():
            return job.model(**batch).logits

    # Execute: client 0 (length 2) with tokens 2.. changed, and the global model (all 4 tokens)
    # (a random change: a constant shift of a prompt token's embedding would vanish in BERT's LayerNorm)
    noise = torch.randn(state[name][2:].shape, generator=torch.Generator().manual_seed(0))
    changed = {**state, name: torch.cat([state[name][:2], state[name][2:] + noise])}
    short, short_changed = logits(0, state), logits(0, changed)
    full, full_changed = logits(None, state), logits(None, changed)
    # Assert: the short client never reads tokens 2..; the global model does; loading the global model restores 4
    torch.testing.assert_close(short, short_changed, rtol=0, atol=0)
    assert not torch.allclose(full, full_changed) and not torch.allclose(short, full)
    assert job.model.active_peft_config.num_virtual_tokens == 4
    # Assert: a training step's FLOPs (counted once per kind of step) are counted per prompt length
    from fedcustom.training import _counted_step

    optimizer = torch.optim.SGD([p for p in job.model.parameters() if p.requires_grad], lr=0.0)
    labelled = {**batch, "labels": torch.tensor([1, 0])}
    client.load(0, state)
    short_flops = _counted_step(job.model, labelled, optimizer)[1]
    client.load(None, state)
    assert short_flops < _counted_step(job.model, labelled, optimizer)[1]


def test_unheld_tokens_travel_back_unchanged_and_each_token_is_averaged_over_its_holders(tiny_config) -> None:
    # Execute: lengths 2 and 4, one round
    job, initial, uploads = _run(tiny_config, method__prefix_lengths="2,4")
    name = _prompt_tensor(initial)
    (short_node, short, n_short), (long_node, long, n_long) = sorted(uploads, key=lambda u: u[0])
    # Assert: client 0 trained tokens 0-1 only and sent 2-3 as received; client 1 trained all four
    assert (short_node, long_node) == (0, 1)
    assert torch.equal(short[name][2:], initial[name][2:]) and not torch.equal(short[name][:2], initial[name][:2])
    assert not torch.equal(long[name][2:], initial[name][2:])
    # Assert: tokens 0-1 are the example-weighted mean of both, tokens 2-3 client 1's own; the head is FedAvg's
    merged = job.server.global_state
    w = n_short / (n_short + n_long)
    torch.testing.assert_close(merged[name][:2], w * short[name][:2] + (1 - w) * long[name][:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[name][2:], long[name][2:], rtol=0, atol=0)
    plain = weighted_average([short, long], [n_short, n_long])
    assert not torch.allclose(plain[name][2:], merged[name][2:])  # FedAvg would pull them back toward the start
    for other in (k for k in merged if k != name):
        torch.testing.assert_close(merged[other], plain[other], rtol=0, atol=0)


def test_adaptive_lengths_follow_each_devices_compute_and_memory(tmp_path: Path, tiny_config) -> None:
    # memory counts only when every device gives it; at least one token each
    assert adaptive_lengths([1.0, 0.5, 0.25], [None, 512.0, 256.0], 20) == [20, 10, 5]
    assert adaptive_lengths([1.0, 1.0, 0.01], [2048.0, 512.0, 2048.0], 20) == [20, 5, 1]
    profiles = tmp_path / "devices.csv"
    profiles.write_text("name,compute,memory_mb\nserver,1.0,4096\nphone,0.5,1024\nboard,0.1,512\n")
    cfg = tiny_config(method__prefix_lengths="adaptive", federation__client_profiles=str(profiles),
                      federation__clients=3)
    assert lengths_for(cfg) == [4, 1, 1]  # 4 x min(0.5, 0.25) = 1; 4 x 0.1 rounds to 0, at least 1
    job = build_job(cfg)
    assert [job.server.runtime.local_handler.capacity.length(c) for c in range(3)] == [4, 1, 1]


@pytest.mark.parametrize("overrides, message", [
    ({"method__prefix_lengths": "2,9"}, "between 1 and the adapter's --num-virtual-tokens 4"),
    ({"method__prefix_lengths": "two"}, "expected comma-separated integers"),
    ({"method__prefix_lengths": "adaptive"}, "give --client-profiles"),
    ({"method__prefix_lengths": "2,4", "method__name": "lora"}, "lengths are numbers of virtual tokens"),
    ({"method__prefix_lengths": "2,4", "federation__strategy": "median"}, "--strategy median"),
    ({"method__prefix_lengths": "2,4", "privacy__secagg": True}, "--secagg"),
])
def test_prompt_lengths_that_cannot_work_are_clear_errors(tiny_config, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_job(tiny_config(**overrides))
