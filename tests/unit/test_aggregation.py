"""The round's aggregation composes around the server: the same round runs the strategy's merge, central DP's
clipped and noised mean, or secure aggregation's masked sum, and the assembler picks which from the config."""

from __future__ import annotations

import pytest
import torch

from fedcustom.codecs import RawCodec
from fedcustom.config import build_config
from fedcustom.privacy.dp import CentralDP, noise_generator
from fedcustom.protocols.sharing.aggregation import (
    CentralDPAggregation, Collected, SecAggSettings, SecureAggregation, StrategyAggregation, collect_replies,
)
from fedcustom.protocols.sharing.server import FederatedServer
from fedcustom.runtime import EmbeddedRuntime, Message, Reply
from fedcustom.strategies import FedAvg
from fedcustom.training import LocalSchedule
from fedcustom.trust import aggregation_for

START = {"w": torch.zeros(3, dtype=torch.float64)}
TARGETS = {0: torch.tensor([1.0, 0.0, 0.0]), 1: torch.tensor([0.0, 4.0, 0.0]), 2: torch.tensor([0.0, 0.0, -2.0])}


def _handler(node: int, message: Message) -> Reply:
    """Each client uploads the global state moved by its own target (10 examples each)."""
    codec = RawCodec()
    state = {"w": codec.decode(message.payload)["w"] + TARGETS[node].double()}
    return Reply(codec.encode(state), num_examples=10, metrics={"train_loss": float(node)})


def _server(aggregation=None) -> FederatedServer:
    return FederatedServer(EmbeddedRuntime(_handler, 3), FedAvg(), RawCodec(), START, lambda s: {"accuracy": 0.0},
                           LocalSchedule(lr=0.1, batch_size=4), clients_per_round=3, seed=7, aggregation=aggregation)


def test_the_default_aggregation_is_the_strategys_merge() -> None:
    server = _server()
    server.run_round(1)
    assert isinstance(server.aggregation, StrategyAggregation)
    assert torch.allclose(server.global_state["w"], torch.tensor([1 / 3, 4 / 3, -2 / 3], dtype=torch.float64))


def test_central_dp_merges_the_noised_mean_of_clipped_updates_drawn_from_seed_and_round() -> None:
    # Prepare: clip 1 (client 1's update of norm 4 is scaled to norm 1, client 2's of norm 2 too), noise 0.5, drawn
    # from the run seed (--dp-reproducible-noise, so that the test can compute it)
    dp = CentralDP(clip_norm=1.0, noise_multiplier=0.5, expected_clients=3)
    server = _server(CentralDPAggregation(dp, reproducible_noise=True))
    # Execute
    result = server.run_round(2)
    # Assert: the mean of the clipped updates plus N(0, (0.5 * 1 / 3)^2) from the round's own generator
    clipped_mean = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64) / 3
    noise = torch.randn(3, generator=noise_generator(7, 2), dtype=torch.float64) * (0.5 / 3)
    assert torch.allclose(server.global_state["w"], clipped_mean + noise)
    assert result.privacy["clipped_fraction"] == pytest.approx(2 / 3)
    assert result.privacy["noise_std"] == pytest.approx(0.5 / 3)


def test_central_dp_noise_cannot_be_regenerated_from_the_run_seed_by_default() -> None:
    # Prepare: the same round twice with the default noise source
    dp = CentralDP(clip_norm=1.0, noise_multiplier=0.5, expected_clients=3)
    first, second = _server(CentralDPAggregation(dp)), _server(CentralDPAggregation(dp))
    # Execute
    first.run_round(2), second.run_round(2)
    # Assert: the noise is neither the seed's (which the config and every message reveal) nor repeated
    clipped_mean = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64) / 3
    seeded = torch.randn(3, generator=noise_generator(7, 2), dtype=torch.float64) * (0.5 / 3)
    assert not torch.allclose(first.global_state["w"], clipped_mean + seeded)
    assert not torch.equal(first.global_state["w"], second.global_state["w"])


def test_an_aggregation_plugs_into_the_round_without_changing_the_server() -> None:
    # Prepare: an aggregation that keeps only the first client's update (what a new mechanism would replace)
    class FirstOnly:
        def collect(self, server, rnd, chosen, config, result, on_reply) -> Collected:
            return collect_replies(server, rnd, chosen, config, result, on_reply, running=None)

        def merge(self, server, rnd, collected: Collected, result) -> dict[str, torch.Tensor]:
            return min(collected.updates, key=lambda u: u.node_id).state

    server = _server(FirstOnly())
    # Execute
    result = server.run_round(1)
    # Assert: the round's bookkeeping is the server's, the merge is the plug-in's
    assert torch.equal(server.global_state["w"], TARGETS[0].double())
    assert sorted(result.bytes_up) == [0, 1, 2] and result.train_loss == pytest.approx(1.0)


@pytest.mark.parametrize(("privacy", "kind"), [
    ({}, StrategyAggregation),
    ({"dp": "central", "noise_multiplier": 0.3}, CentralDPAggregation),
    ({"dp": "local", "noise_multiplier": 0.3}, StrategyAggregation),  # clients privatize; the server merges as usual
    ({"secagg": True}, SecureAggregation),
])
def test_the_assembler_picks_the_aggregation_from_the_config(privacy: dict, kind: type) -> None:
    cfg = build_config({"federation": {"clients": 4, "clients_per_round": 2}, "privacy": privacy})
    aggregation = aggregation_for(cfg)
    assert type(aggregation) is kind
    if kind is CentralDPAggregation:
        assert aggregation.dp.expected_clients == 2 and aggregation.dp.noise_multiplier == 0.3
    if kind is SecureAggregation:
        assert aggregation.settings == SecAggSettings(cfg.privacy.secagg_clip, cfg.privacy.secagg_threshold)
