"""Client-drift correction: FedProx's proximal term and SCAFFOLD's control variates (Karimireddy et al., ICML 2020,
Algorithm 1, option II), run through the real client, server and embedded runtime on a tiny quadratic."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from fedcustom.codecs import RawCodec
from fedcustom.data.features import tokenize
from fedcustom.protocols.sharing.client import TrainingClient
from fedcustom.protocols.sharing.server import Convergence, FederatedServer
from fedcustom.runtime import EmbeddedRuntime
from fedcustom.scaffold import ServerControl, client_update
from fedcustom.strategies import FedAvg
from fedcustom.training import DriftControl, LocalSchedule, train_local

from conftest import toy_rows

# Client i minimises f_i(w) = 1/2 sum_j a_ij (w_j - t_ij)^2: different curvatures and optima, so plain local
# SGD drifts toward each client's own optimum.
CURVATURE = np.array([[1.0, 0.2, 3.0], [0.5, 2.0, 0.3]])
TARGET = np.array([[1.0, -2.0, 0.5], [-3.0, 1.0, 2.0]])


class Quadratic(nn.Module):
    """A 'model' whose loss on a batch is the quadratic of the client its rows belong to (label = client id)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, labels: torch.Tensor, **_: torch.Tensor) -> SimpleNamespace:
        a, t = torch.tensor(CURVATURE)[labels[0]], torch.tensor(TARGET)[labels[0]]
        return SimpleNamespace(loss=0.5 * (a * (self.w - t) ** 2).sum())


def client_tables(tiny_bert: str) -> tuple[dict[int, datasets.Dataset], AutoTokenizer]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tables = {}
    for node in (0, 1):
        rows = toy_rows(8).rename(columns={"sentence": "text"}).assign(label=node)
        tables[node] = tokenize(datasets.Dataset.from_pandas(rows), tokenizer, 16)
    return tables, tokenizer


def reference_scaffold(rounds: int, steps: int | tuple[int, int], lr: float, clients: int = 2,
                       merge: tuple[float, float] = (0.5, 0.5),
                       c_weights: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Algorithm 1 (option II, global rate 1) in numpy; the two clients train every round (``steps``: K, or each
    client's), the model is merged with ``merge`` and c moves by ``c_weights`` of the changes (default: the paper's
    1/N with ``clients`` as N; more than 2: the others never answer)."""
    steps = (steps, steps) if isinstance(steps, int) else steps
    c_weights = c_weights or (1 / clients, 1 / clients)
    x, c, ci = np.zeros(3), np.zeros(3), [np.zeros(3), np.zeros(3)]
    for _ in range(rounds):
        ys, changes = [], []
        for i in (0, 1):
            y = x.copy()
            for _ in range(steps[i]):
                y = y - lr * (CURVATURE[i] * (y - TARGET[i]) - ci[i] + c)
            new = ci[i] - c + (x - y) / (steps[i] * lr)
            changes.append(new - ci[i])
            ci[i] = new
            ys.append(y)
        x = merge[0] * ys[0] + merge[1] * ys[1]
        c = c + c_weights[0] * changes[0] + c_weights[1] * changes[1]
    return x, c, ci


def test_scaffold_through_client_and_server_follows_algorithm_1(tiny_bert: str) -> None:
    # Prepare: 8 rows per client in batches of 4 -> 2 steps an epoch, 2 epochs -> K = 4 SGD steps per round
    tables, tokenizer = client_tables(tiny_bert)
    model = Quadratic()
    client = TrainingClient(model, tokenizer, RawCodec(), tables)
    schedule = LocalSchedule(lr=0.1, batch_size=4, epochs=2, count_flops=False, optimizer="sgd")
    server = FederatedServer(EmbeddedRuntime(client, 2), FedAvg(), RawCodec(), {"w": torch.zeros(3, dtype=torch.float64)},
                             lambda s: {"accuracy": 0.0}, schedule, clients_per_round=2, seed=0,
                             convergence=Convergence(scaffold=True))
    # Execute
    results = [server.run_round(r) for r in (1, 2, 3)]
    # Assert: the global state, the server's control variate and each client's own match the reference
    x, c, ci = reference_scaffold(rounds=3, steps=4, lr=0.1)
    assert np.allclose(server.global_state["w"].numpy(), x, atol=1e-10)
    assert np.allclose(server.control.c["w"].numpy(), c, atol=1e-10)
    # (each client's round-3 c_i waits for the server's word that it applied round 3's change: its next message)
    assert server.settled == {0: 3, 1: 3} and all(client.pending[i][0] == 3 for i in (0, 1))
    assert all(np.allclose(client.pending[i][1]["w"].numpy(), ci[i], atol=1e-10) for i in (0, 1))
    # ... and the control variates' bytes are counted both ways: more than the model payload alone
    payload = len(RawCodec().encode({"w": torch.zeros(3, dtype=torch.float64)}))
    assert all(b >= 2 * payload for r in results for b in [*r.bytes_up.values(), *r.bytes_down.values()])


def test_steps_the_fp16_scaler_skipped_are_not_among_scaffolds_k(tiny_bert: str, monkeypatch) -> None:
    # Prepare: the client's training reports 4 steps of which the gradient scaler skipped 1 (fp16 overflow)
    from fedcustom import scaffold
    from fedcustom.protocols.sharing import client as sharing_client
    from fedcustom.training import TrainResult

    tables, tokenizer = client_tables(tiny_bert)
    client = TrainingClient(Quadratic(), tokenizer, RawCodec(), tables)
    schedule = LocalSchedule(lr=0.1, batch_size=4, epochs=2, count_flops=False, optimizer="sgd")
    server = FederatedServer(EmbeddedRuntime(client, 2), FedAvg(), RawCodec(), {"w": torch.zeros(3, dtype=torch.float64)},
                             lambda s: {"accuracy": 0.0}, schedule, clients_per_round=2, seed=0,
                             convergence=Convergence(scaffold=True))
    monkeypatch.setattr(sharing_client, "train_local", lambda *a, **k: TrainResult(8, 4, 0.5, 0, skipped_steps=1))
    ks, update = [], scaffold.client_update
    monkeypatch.setattr(scaffold, "client_update", lambda *a: ks.append(a[4]) or update(*a))
    # Execute
    server.run_round(1)
    # Assert: K = the 3 steps taken, for each client
    assert ks == [3, 3]


def test_scaffold_divides_by_the_federations_clients_not_the_nodes_that_are_up(tiny_bert: str) -> None:
    # Prepare: a federation of 5 clients of which only 2 nodes are up (on Flower: the others' machines died)
    tables, tokenizer = client_tables(tiny_bert)
    client = TrainingClient(Quadratic(), tokenizer, RawCodec(), tables)
    schedule = LocalSchedule(lr=0.1, batch_size=4, epochs=2, count_flops=False, optimizer="sgd")
    server = FederatedServer(EmbeddedRuntime(client, 2), FedAvg(), RawCodec(), {"w": torch.zeros(3, dtype=torch.float64)},
                             lambda s: {"accuracy": 0.0}, schedule, clients_per_round=2, seed=0,
                             convergence=Convergence(scaffold=True, clients=5))
    # Execute
    for r in (1, 2):
        server.run_round(r)
    # Assert: c moved by 1/5 of the changes each round (Algorithm 1's |S|/N times their mean)
    x, c, _ = reference_scaffold(rounds=2, steps=4, lr=0.1, clients=5)
    assert np.allclose(server.control.c["w"].numpy(), c, atol=1e-10)
    assert np.allclose(server.global_state["w"].numpy(), x, atol=1e-10)


def test_scaffold_weighted_by_examples_moves_c_as_the_model_is_merged(tiny_bert: str) -> None:
    # Prepare: client 0 holds 8 rows, client 1 holds 24 (K = 4 and 12 SGD steps a round; FedAvg weights 1/4, 3/4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    sizes = (8, 24)
    tables = {node: tokenize(datasets.Dataset.from_pandas(
        toy_rows(n).rename(columns={"sentence": "text"}).assign(label=node)), tokenizer, 16)
        for node, n in enumerate(sizes)}
    client = TrainingClient(Quadratic(), tokenizer, RawCodec(), tables)
    schedule = LocalSchedule(lr=0.05, batch_size=4, epochs=2, count_flops=False, optimizer="sgd")
    server = FederatedServer(EmbeddedRuntime(client, 2), FedAvg(), RawCodec(), {"w": torch.zeros(3, dtype=torch.float64)},
                             lambda s: {"accuracy": 0.0}, schedule, clients_per_round=2, seed=0,
                             convergence=Convergence(scaffold=True, clients=2, scaffold_weights="examples"))
    # Execute
    for r in (1, 2, 3):
        server.run_round(r)
    # Assert: Algorithm 1 with the model merged by examples and c moved by the same weights, not the paper's 1/N
    weights = (0.25, 0.75)
    x, c, _ = reference_scaffold(rounds=3, steps=(4, 12), lr=0.05, merge=weights, c_weights=weights)
    assert np.allclose(server.global_state["w"].numpy(), x, atol=1e-10)
    assert np.allclose(server.control.c["w"].numpy(), c, atol=1e-10)
    assert not np.allclose(c, reference_scaffold(rounds=3, steps=(4, 12), lr=0.05, merge=weights)[1], atol=1e-3)


def test_a_rejected_update_leaves_its_clients_control_variate_as_it_was(tiny_bert: str) -> None:
    # Prepare: client 1's round-2 update is lost after it trained (its reply dropped, as a straggler's); the
    # reference is Algorithm 1 with that client skipped in round 2 (its c_i unchanged, c moved by client 0's change)
    tables, tokenizer = client_tables(tiny_bert)
    client = TrainingClient(Quadratic(), tokenizer, RawCodec(), tables)

    def lossy(node: int, message):
        reply = client(node, message)
        return dataclasses.replace(reply, payload=b"", error="timed out") if (node, message.round) == (1, 2) else reply

    schedule = LocalSchedule(lr=0.1, batch_size=4, epochs=2, count_flops=False, optimizer="sgd")
    server = FederatedServer(EmbeddedRuntime(lossy, 2), FedAvg(), RawCodec(), {"w": torch.zeros(3, dtype=torch.float64)},
                             lambda s: {"accuracy": 0.0}, schedule, clients_per_round=2, seed=0,
                             convergence=Convergence(scaffold=True))
    # Execute
    results = [server.run_round(r) for r in (1, 2, 3)]
    # Assert: round 2 rejected client 1; in round 3 it trained from its round-1 c_i, and c = mean of the c_i still
    assert list(results[1].rejected) == [1] and not results[2].rejected
    x, c, ci = np.zeros(3), np.zeros(3), [np.zeros(3), np.zeros(3)]
    for rnd in (1, 2, 3):
        ys, changes = {}, {}
        for i in (0, 1):
            y = x.copy()
            for _ in range(4):
                y = y - 0.1 * (CURVATURE[i] * (y - TARGET[i]) - ci[i] + c)
            new = ci[i] - c + (x - y) / (4 * 0.1)
            if (i, rnd) != (1, 2):
                changes[i], ci[i], ys[i] = new - ci[i], new, y
        x = sum(ys.values()) / len(ys)
        c = c + sum(changes.values()) / 2
    assert np.allclose(server.global_state["w"].numpy(), x, atol=1e-10)
    assert np.allclose(server.control.c["w"].numpy(), c, atol=1e-10)
    assert np.allclose(server.control.c["w"].numpy(), (client.pending[0][1]["w"] + client.pending[1][1]["w"]).numpy() / 2,
                       atol=1e-10)


def test_scaffold_corrects_drift_that_plain_local_sgd_suffers(tiny_bert: str) -> None:
    # The global optimum of f_0 + f_1 is the curvature-weighted mean of the targets; with many local steps FedAvg
    # settles elsewhere, SCAFFOLD at the optimum.
    tables, tokenizer = client_tables(tiny_bert)
    optimum = (CURVATURE * TARGET).sum(0) / CURVATURE.sum(0)

    def final(scaffold: bool) -> np.ndarray:
        model = Quadratic()
        client = TrainingClient(model, tokenizer, RawCodec(), tables)
        schedule = LocalSchedule(lr=0.1, batch_size=4, epochs=5, count_flops=False, optimizer="sgd")
        server = FederatedServer(EmbeddedRuntime(client, 2), FedAvg(), RawCodec(),
                                 {"w": torch.zeros(3, dtype=torch.float64)}, lambda s: {"accuracy": 0.0}, schedule,
                                 clients_per_round=2, seed=0, convergence=Convergence(scaffold=scaffold))
        for rnd in range(1, 31):
            server.run_round(rnd)
        return server.global_state["w"].numpy()

    assert np.abs(final(True) - optimum).max() < 1e-3 < np.abs(final(False) - optimum).max()


def test_client_control_update_is_option_ii() -> None:
    own, server, x, y = ({"w": torch.tensor([v])} for v in (0.5, 0.25, 1.0, 0.2))
    new = client_update(own, server, x, y, steps=4, lr=0.1)
    assert new["w"].item() == pytest.approx(0.5 - 0.25 + (1.0 - 0.2) / 0.4)
    control = ServerControl({"w": torch.zeros(1)})
    control.apply([{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], total_clients=8)
    assert control.c["w"].item() == pytest.approx(4.0 / 8)  # |S|/N times the mean change


def _lora_setup(tiny_bert: str):
    from fedcustom.config import MethodConfig
    from fedcustom.methods import get_method, trainable_state
    from fedcustom.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    table = tokenize(datasets.Dataset.from_pandas(toy_rows(40)).rename_column("sentence", "text"), tokenizer, 32)
    model = get_method("lora").build(load_model(tiny_bert, "classification", ["neg", "pos"], tokenizer, 0),
                                     MethodConfig(name="lora"), "classification", tokenizer)
    return tokenizer, table, model, trainable_state(model)


def _distance(model: nn.Module, anchor: dict[str, torch.Tensor]) -> float:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return sum(float((params[n].detach() - anchor[n]).pow(2).sum()) for n in anchor) ** 0.5


def test_fedprox_with_mu_zero_is_fedavg_and_a_larger_mu_stays_closer(tiny_bert: str) -> None:
    from fedcustom.methods import load_trainable_state, trainable_state

    tokenizer, table, model, start = _lora_setup(tiny_bert)
    schedule = LocalSchedule(lr=1e-2, batch_size=8, epochs=2, count_flops=False)
    ends = {}
    for name, drift in [("plain", None), ("mu0", DriftControl(anchor=start, prox_mu=0.0)),
                        ("mu10", DriftControl(anchor=start, prox_mu=10.0))]:
        load_trainable_state(model, start)
        train_local(model, table, tokenizer, schedule, seed=3, drift=drift)
        ends[name] = (trainable_state(model), _distance(model, start))
    plain, mu0 = ends["plain"][0], ends["mu0"][0]
    assert all(torch.equal(plain[k], mu0[k]) for k in plain)  # the proximal path with mu = 0 changes nothing
    assert ends["mu10"][1] < 0.5 * ends["plain"][1]
