"""Server optimizers (Reddi et al., ICLR 2021, Algorithm 2; FedAvgM): each step against one computed by hand,
FedAvg with rate 1 as plain FedAvg bit for bit, and composition with any strategy's aggregate."""

from __future__ import annotations

import math

import pytest
import torch

from fedcustom.codecs import RawCodec
from fedcustom.protocols.sharing.server import Convergence, FederatedServer
from fedcustom.runtime import EmbeddedRuntime, Message, Reply
from fedcustom.strategies import FedAvg, Median
from fedcustom.strategies.server_opt import ServerOptimizer, ServerOptSettings
from fedcustom.training import LocalSchedule

X = {"w": torch.tensor([1.0, -2.0, 0.5])}
AGG1 = {"w": torch.tensor([1.5, -2.5, 0.5])}  # delta (0.5, -0.5, 0)
AGG2_DELTA = [-0.25, -1.0, 2.0]  # the second round's aggregate minus the state after round one


def two_steps(name: str, **kw) -> tuple[list[float], list[float]]:
    """The state after round one and round two of a server optimizer."""
    opt = ServerOptimizer(ServerOptSettings(name, **kw))
    first = opt.step(X, AGG1)
    second = opt.step(first, {"w": first["w"] + torch.tensor(AGG2_DELTA)})
    return first["w"].tolist(), second["w"].tolist()


def by_hand(name: str, lr: float, b1: float, b2: float, eps: float) -> tuple[list[float], list[float]]:
    """Algorithm 2 of Reddi et al. written out per coordinate in plain floats."""
    x = X["w"].tolist()
    deltas = [[0.5, -0.5, 0.0], AGG2_DELTA]
    m, v, states = [0.0] * 3, [eps**2] * 3, []
    for delta in deltas:
        for i, d in enumerate(delta):
            m[i] = b1 * m[i] + (1 - b1) * d
            if name == "adagrad":
                v[i] = v[i] + d * d
            elif name == "yogi":
                v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d) * (v[i] != d * d)
            else:
                v[i] = b2 * v[i] + (1 - b2) * d * d
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + eps)
        states.append(list(x))
    return states[0], states[1]


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_adaptive_optimizers_match_a_hand_computed_step(name: str) -> None:
    # Prepare
    settings = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    # Execute
    first, second = two_steps(name, **settings)
    # Assert
    want_first, want_second = by_hand(name, settings["lr"], settings["beta1"], settings["beta2"], settings["eps"])
    assert first == pytest.approx(want_first, rel=1e-6) and second == pytest.approx(want_second, rel=1e-6)


def test_momentum_accumulates_the_pseudo_gradients() -> None:
    # m1 = d1; m2 = 0.9 m1 + d2; x2 = x1 + lr m2
    first, second = two_steps("avgm", lr=0.5, momentum=0.9)
    x1 = [1.0 + 0.5 * 0.5, -2.0 - 0.5 * 0.5, 0.5]
    m2 = [0.9 * 0.5 - 0.25, 0.9 * -0.5 - 1.0, 2.0]
    assert first == pytest.approx(x1) and second == pytest.approx([a + 0.5 * b for a, b in zip(x1, m2)])


def test_fedavg_with_rate_one_is_the_aggregate_bit_for_bit_and_other_rates_scale_the_step() -> None:
    x = {"w": torch.randn(1000)}
    aggregate = {"w": torch.randn(1000)}
    assert torch.equal(ServerOptimizer(ServerOptSettings("fedavg", lr=1.0)).step(x, aggregate)["w"], aggregate["w"])
    half = ServerOptimizer(ServerOptSettings("fedavg", lr=0.5)).step(x, aggregate)["w"]
    assert torch.allclose(half, (x["w"] + aggregate["w"]) / 2, atol=1e-6)


def _server(strategy, convergence: Convergence | None) -> FederatedServer:
    codec, values = RawCodec(), {0: 1.0, 1: 4.0, 2: -3.0}

    def handler(node: int, message: Message) -> Reply:
        state = {k: torch.full_like(v, values[node]) for k, v in codec.decode(message.payload).items()}
        return Reply(payload=codec.encode(state), num_examples=10 + node, metrics={"train_loss": 0.1},
                     round=message.round)

    return FederatedServer(EmbeddedRuntime(handler, 3), strategy, codec, {"w": torch.zeros(4)},
                           lambda s: {"accuracy": 0.0}, LocalSchedule(lr=0.1, batch_size=4), clients_per_round=3,
                           seed=0, convergence=convergence)


def test_server_optimizer_applies_to_any_strategys_aggregate() -> None:
    # Prepare: plain FedAvg, FedAvg through the fedavg optimizer at rate 1, and adam after the median
    plain, through = _server(FedAvg(), None), _server(FedAvg(), Convergence(ServerOptimizer(ServerOptSettings())))
    adam = ServerOptimizer(ServerOptSettings("adam", lr=0.01))
    robust = _server(Median(), Convergence(adam))
    # Execute
    for server in (plain, through, robust):
        server.run_round(1)
    # Assert: rate 1 is FedAvg bit for bit; adam steps from zero toward the median (1.0) by lr * m / (sqrt(v) + eps)
    assert torch.equal(plain.global_state["w"], through.global_state["w"])
    m, v = 0.1 * 1.0, 0.99 * 1e-6 + 0.01 * 1.0
    assert robust.global_state["w"].tolist() == pytest.approx([0.01 * m / (math.sqrt(v) + 1e-3)] * 4, rel=1e-5)


def test_moments_survive_a_state_dict_round_trip() -> None:
    opt = ServerOptimizer(ServerOptSettings("yogi", lr=0.1))
    state = opt.step(X, AGG1)
    again = ServerOptimizer(ServerOptSettings("yogi", lr=0.1))
    again.load_state_dict(*opt.state_dict())
    nxt = {"w": state["w"] + 1.0}
    assert torch.equal(opt.step(state, nxt)["w"], again.step(state, nxt)["w"]) and again.steps == 2
