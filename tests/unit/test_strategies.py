"""Aggregation strategies: spec parsing, trivial cases, and robustness bounds under attack.

Setting for the attack tests: n = 10 clients, f = 3 of them Byzantine. Honest clients send
global + small noise; attackers send either huge values (1e6) or sign-flipped, 1000x scaled deltas.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcustom.errors import FedCustomError
from fedcustom.strategies import STRATEGY_FORMS, ClientUpdate, FedAvg, get_strategy
from fedcustom.strategies.robust import coordinate_median, trimmed_mean

State = dict[str, torch.Tensor]
ROBUST = ["median", "trimmed-mean:0.3", "krum:3", "multi-krum:3", "multi-krum:3:4", "norm-bound:10"]
ALL = ["fedavg", *ROBUST]
N, F = 10, 3


def make_global(seed: int = 0) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


def honest_states(global_state: State, count: int, seed: int = 1) -> list[State]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in global_state.items()} for _ in range(count)]


def attack(global_state: State, honest: list[State], kind: str) -> list[State]:
    """F Byzantine states: constant 1e6, or the negated honest deltas scaled 1000x."""
    if kind == "huge":
        return [{k: torch.full_like(v, 1e6) for k, v in global_state.items()} for _ in range(F)]
    return [{k: global_state[k] - 1000 * (h[k] - global_state[k]) for k in global_state} for h in honest[:F]]


def as_updates(states: list[State], examples: int = 10) -> list[ClientUpdate]:
    return [ClientUpdate(node_id=i, state=s, num_examples=examples) for i, s in enumerate(states)]


def honest_range(honest: list[State], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack([h[name] for h in honest])
    return stacked.min(dim=0).values, stacked.max(dim=0).values


def within_honest_range(out: State, honest: list[State]) -> bool:
    return all(bool(((lo <= out[k]) & (out[k] <= hi)).all()) for k in out for lo, hi in [honest_range(honest, k)])


def delta_norm(a: State, b: State) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


# ---- spec parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["fedavg", "median", "trimmed-mean:0.2", "krum:1", "multi-krum:1:3", "multi-krum:2",
                                  "norm-bound:0.5"])
def test_valid_specs_build_named_strategies(spec: str) -> None:
    # Execute
    strategy = get_strategy(spec)
    # Assert
    assert strategy.name == spec


def test_fedavg_spec_is_unchanged() -> None:
    assert isinstance(get_strategy("fedavg"), FedAvg)


@pytest.mark.parametrize("spec", ["", "foo", "fedavg:1", "median:1", "trimmed-mean", "trimmed-mean:x",
                                  "trimmed-mean:0.5", "trimmed-mean:-0.1", "trimmed-mean:nan", "krum", "krum:-1",
                                  "krum:1.5", "multi-krum", "multi-krum:1:0", "multi-krum:1:2:3", "norm-bound:0",
                                  "norm-bound:-1", "norm-bound:inf"])
def test_malformed_specs_name_the_spec_and_the_forms(spec: str) -> None:
    # Execute
    with pytest.raises(FedCustomError) as info:
        get_strategy(spec)
    # Assert
    assert repr(spec) in str(info.value)
    assert all(form in str(info.value) for form in STRATEGY_FORMS)


# ---- trivial cases --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ALL)
def test_shapes_dtypes_and_non_float_tensors(spec: str) -> None:
    # Prepare: mixed dtypes, a step counter the first update carries
    global_state = {"w": torch.zeros(2, 3), "h": torch.zeros(4, dtype=torch.float16), "steps": torch.tensor(0)}
    states = [{"w": torch.full((2, 3), float(i)), "h": torch.full((4,), 0.5 * i, dtype=torch.float16),
               "steps": torch.tensor(5 + i)} for i in range(7)]
    # Execute
    out = get_strategy(spec).aggregate(global_state, as_updates(states))
    # Assert
    assert set(out) == set(global_state)
    assert all(out[k].shape == v.shape and out[k].dtype == v.dtype for k, v in global_state.items())
    if spec != "fedavg":  # FedAvg averages every tensor; the robust strategies copy non-floats from the first
        assert int(out["steps"]) == 5


@pytest.mark.parametrize("spec", ALL)
@pytest.mark.parametrize("count", [1, 2, 7])
def test_identical_clients_return_their_state(spec: str, count: int) -> None:
    # Prepare
    global_state = make_global()
    state = honest_states(global_state, 1)[0]
    # Execute
    out = get_strategy(spec).aggregate(global_state, as_updates([state] * count))
    # Assert
    assert all(torch.equal(out[k], state[k]) for k in state)


@pytest.mark.parametrize("spec", ALL)
def test_no_updates_keep_the_global_state(spec: str) -> None:
    global_state = make_global()
    assert get_strategy(spec).aggregate(global_state, []) is global_state


def test_norm_bound_scales_a_long_delta_to_c() -> None:
    # Prepare: every client moves by a delta of norm 5
    global_state = {"w": torch.zeros(2), "b": torch.zeros(1)}
    state = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    # Execute
    out = get_strategy("norm-bound:1").aggregate(global_state, as_updates([state] * 3))
    # Assert: the same direction, length 1
    assert torch.allclose(out["w"], torch.tensor([0.6, 0.0])) and torch.allclose(out["b"], torch.tensor([0.8]))


def test_krum_with_too_few_updates_warns_and_uses_the_median(caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: krum:1 needs 5 updates, gets 4
    global_state = make_global()
    updates = as_updates(honest_states(global_state, 4))
    # Execute
    with caplog.at_level(logging.WARNING):
        out = get_strategy("krum:1").aggregate(global_state, updates)
    # Assert
    assert "krum:1 needs at least 5 updates, got 4" in caplog.text
    median = get_strategy("median").aggregate(global_state, updates)
    assert all(torch.equal(out[k], median[k]) for k in out)


# ---- robustness under attack ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["huge", "sign-flip"])
def test_fedavg_is_dragged_outside_the_honest_range(kind: str) -> None:
    """Why the robust strategies exist: one mean over 3/10 attackers lands far from every honest client."""
    # Prepare
    global_state = make_global()
    honest = honest_states(global_state, N - F)
    # Execute
    out = FedAvg().aggregate(global_state, as_updates(attack(global_state, honest, kind) + honest))
    # Assert: some coordinate lies more than 1.0 beyond the honest range (honest spread is ~0.1)
    lo, hi = honest_range(honest, "w")
    assert float(torch.maximum(lo - out["w"], out["w"] - hi).max()) > 1.0


@pytest.mark.parametrize("kind", ["huge", "sign-flip"])
@pytest.mark.parametrize("spec", ["median", "trimmed-mean:0.3", "trimmed-mean:0.4", "multi-krum:3", "multi-krum:3:4"])
def test_coordinate_outputs_stay_in_the_honest_range(spec: str, kind: str) -> None:
    """Median (f < n/2), trimmed mean (f <= floor(beta n)) and Multi-Krum (m <= n - f, n >= 2f + 3)
    each produce, per coordinate, a value inside [min, max] of the honest values."""
    # Prepare
    global_state = make_global()
    honest = honest_states(global_state, N - F)
    updates = as_updates(honest[:2] + attack(global_state, honest, kind) + honest[2:])  # attackers mid-list
    # Execute
    out = get_strategy(spec).aggregate(global_state, updates)
    # Assert
    assert within_honest_range(out, honest)


@pytest.mark.parametrize("kind", ["huge", "sign-flip"])
def test_krum_picks_an_honest_client(kind: str) -> None:
    # Prepare: n = 10 >= 2f + 3 = 9
    global_state = make_global()
    honest = honest_states(global_state, N - F)
    # Execute
    out = get_strategy("krum:3").aggregate(global_state, as_updates(attack(global_state, honest, kind) + honest))
    # Assert
    assert any(all(torch.equal(out[k], h[k]) for k in h) for h in honest)


@pytest.mark.parametrize("kind", ["huge", "sign-flip"])
def test_norm_bound_limits_the_attackers_pull(kind: str) -> None:
    """Bound: with equal weights and C >= every honest delta norm (so honest deltas pass unchanged),
    out - g = (1/n) sum_i clip(d_i), and the honest mean is g + mean_H(d). Then
    out - honest_mean = (1/n) sum_A clip(d_a) - (f/n) mean_H(d), so
    ||out - honest_mean|| <= (f/n) * (C + ||mean_H(d)||) <= (f/n) * (C + max_H ||d_h||)."""
    # Prepare
    global_state = make_global()
    honest = honest_states(global_state, N - F)
    honest_norms = [delta_norm(h, global_state) for h in honest]
    c = 1.5 * max(honest_norms)
    honest_mean = FedAvg().aggregate(global_state, as_updates(honest))
    updates = as_updates(attack(global_state, honest, kind) + honest)
    # Execute
    out = get_strategy(f"norm-bound:{c!r}").aggregate(global_state, updates)
    # Assert
    assert delta_norm(out, honest_mean) <= F / N * (c + max(honest_norms)) + 1e-5
    assert delta_norm(FedAvg().aggregate(global_state, updates), honest_mean) > 100 * F / N * (c + max(honest_norms))


# ---- properties -----------------------------------------------------------------------------

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
wild = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), honest_count=st.integers(1, 8), dim=st.integers(1, 4))
def test_median_and_trimmed_mean_stay_in_the_honest_range(data: st.DataObject, honest_count: int, dim: int) -> None:
    """Any f < n/2 attackers with arbitrary values cannot push the median outside the honest range;
    nor the trimmed mean when floor(beta n) >= f."""
    # Prepare
    attackers = data.draw(st.integers(0, honest_count - 1))
    honest = [torch.tensor(data.draw(st.lists(finite, min_size=dim, max_size=dim))) for _ in range(honest_count)]
    bad = [torch.tensor(data.draw(st.lists(wild, min_size=dim, max_size=dim))) for _ in range(attackers)]
    values = data.draw(st.permutations(honest + bad))
    n = len(values)
    beta = min(0.49, (attackers + 0.5) / n)  # floor(beta n) >= attackers, since attackers < n / 2
    lo, hi = torch.stack(honest).double().min(dim=0).values, torch.stack(honest).double().max(dim=0).values
    # Execute
    med, trim = coordinate_median(values), trimmed_mean(values, beta)
    # Assert
    for out in (med, trim):
        assert bool(((lo <= out) & (out <= hi)).all())
