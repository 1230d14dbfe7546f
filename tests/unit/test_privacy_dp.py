"""Client-level DP: clipping bounds, noise scale, accountant values, checkpoint round-trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from fedcustom.privacy import (
    CentralDP,
    PrivacyAccountant,
    clip_update,
    gaussian_noise_like,
    noise_generator,
    privatize_locally,
    update_norm,
)

# opacus' default RDP orders, written out here so the reference does not borrow them from the code under test
DEFAULT_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def random_state(seed: int, sizes: list[int], scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(n, generator=gen) * scale for i, n in enumerate(sizes)}


def opacus_conversion(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """RDP -> (eps, delta) as opacus.accountants.analysis.rdp.get_privacy_spent does (Balle et al., 2020)."""
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


def sgm_rdp_integer(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Sampled Gaussian Mechanism at integer order (Mironov, Talwar, Zhang 2019, binomial sum)."""
    log_terms = [math.log(math.comb(alpha, k)) + (alpha - k) * math.log1p(-q) + k * math.log(q)
                 + (k * k - k) / (2 * sigma**2) for k in range(alpha + 1)]
    top = max(log_terms)
    return (top + math.log(sum(math.exp(t - top) for t in log_terms))) / (alpha - 1)


tensor_sizes = st.lists(st.integers(1, 40), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(sizes=tensor_sizes, seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e2), clip=st.floats(1e-3, 10.0))
def test_clipping_bounds_norm_and_preserves_direction(sizes: list[int], seed: int, scale: float, clip: float) -> None:
    # Prepare
    delta = random_state(seed, sizes, scale)
    norm_before = update_norm(delta)

    # Execute
    clipped, reported = clip_update(delta, clip)

    # Assert
    assert reported == pytest.approx(norm_before)
    assert update_norm(clipped) <= clip + 1e-6
    flat_in = torch.cat([t.double() for t in delta.values()])
    flat_out = torch.cat([t.double() for t in clipped.values()])
    cosine = float(flat_in @ flat_out) / (flat_in.norm() * flat_out.norm())
    assert cosine == pytest.approx(1.0, abs=1e-6)
    if norm_before <= clip:
        assert all(torch.equal(clipped[k], delta[k]) for k in delta)
    else:
        assert update_norm(clipped) == pytest.approx(clip, rel=1e-5)


def test_clipping_leaves_non_float_tensors_alone() -> None:
    # Prepare
    delta = {"w": torch.tensor([30.0, 40.0]), "count": torch.tensor([7, 9])}

    # Execute
    clipped, norm = clip_update(delta, 5.0)

    # Assert
    assert norm == 50.0
    assert torch.equal(clipped["w"], torch.tensor([3.0, 4.0]))
    assert torch.equal(clipped["count"], delta["count"])


def test_noise_is_reproducible_from_seed_and_round() -> None:
    # Prepare
    state = random_state(0, [100, 7])

    # Execute
    first = gaussian_noise_like(state, 1.0, noise_generator(3, 5))
    again = gaussian_noise_like(state, 1.0, noise_generator(3, 5))
    other_round = gaussian_noise_like(state, 1.0, noise_generator(3, 6))
    client_0 = gaussian_noise_like(state, 1.0, noise_generator(3, 5, node=0))

    # Assert
    assert all(torch.equal(first[k], again[k]) for k in state)
    assert not torch.equal(first["t0"], other_round["t0"])
    assert not torch.equal(first["t0"], client_0["t0"])


def test_central_noise_std_is_multiplier_times_clip_over_clients() -> None:
    # Prepare: clients that did not move, so the change of the global state is the noise alone
    global_state = {"big": torch.zeros(200_000), "bias": torch.zeros(3)}
    clients = [{k: t.clone() for k, t in global_state.items()} for _ in range(4)]
    dp = CentralDP(clip_norm=2.0, noise_multiplier=1.3)

    # Execute
    new_state, stats = dp.aggregate(global_state, clients, noise_generator(0, 1))

    # Assert
    expected = 1.3 * 2.0 / 4
    assert stats["noise_std"] == pytest.approx(expected)
    assert float(new_state["big"].std()) == pytest.approx(expected, rel=0.02)
    assert stats["clients"] == 4 and stats["clipped_fraction"] == 0.0


def test_central_noise_uses_fixed_denominator_when_given() -> None:
    # Prepare
    global_state = {"big": torch.zeros(200_000)}
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_clients=10)

    # Execute
    new_state, stats = dp.aggregate(global_state, [dict(global_state)] * 3, noise_generator(0, 1))

    # Assert
    assert stats["noise_std"] == pytest.approx(0.1)
    assert float(new_state["big"].std()) == pytest.approx(0.1, rel=0.02)


def test_local_noise_std_is_multiplier_times_clip() -> None:
    # Prepare
    start = {"big": torch.zeros(200_000)}

    # Execute
    uploaded = privatize_locally(start, start, clip_norm=0.5, noise_multiplier=1.1, generator=noise_generator(0, 1, 2))

    # Assert
    assert float(uploaded["big"].std()) == pytest.approx(0.55, rel=0.02)


def test_local_dp_without_noise_uploads_clipped_update() -> None:
    # Prepare
    start = {"w": torch.tensor([1.0, 1.0]), "steps": torch.tensor([0])}
    trained = {"w": torch.tensor([7.0, 9.0]), "steps": torch.tensor([12])}

    # Execute
    uploaded = privatize_locally(start, trained, clip_norm=5.0, noise_multiplier=0.0, generator=noise_generator(0, 1))

    # Assert: delta (6, 8) has norm 10, clipped to (3, 4); the integer buffer is not uploaded
    assert torch.equal(uploaded["w"], torch.tensor([4.0, 5.0]))
    assert torch.equal(uploaded["steps"], start["steps"])


def test_central_aggregate_without_noise_is_global_plus_mean_of_clipped_deltas() -> None:
    # Prepare
    global_state = random_state(1, [50, 5])
    clients = [random_state(10 + i, [50, 5], scale=0.5 + i) for i in range(3)]
    dp = CentralDP(clip_norm=4.0, noise_multiplier=0.0)

    # Execute
    new_state, stats = dp.aggregate(global_state, clients, noise_generator(0, 1))

    # Assert
    deltas = [{k: c[k].double() - global_state[k].double() for k in c} for c in clients]
    clipped = [clip_update(d, 4.0)[0] for d in deltas]
    for name, g in global_state.items():
        mean = (clipped[0][name] + clipped[1][name] + clipped[2][name]) / 3
        assert torch.equal(new_state[name], (g.double() + mean).to(g.dtype))
    norms = [update_norm(d) for d in deltas]
    assert stats["mean_norm"] == pytest.approx(sum(norms) / 3)
    assert stats["clipped_fraction"] == pytest.approx(sum(n > 4.0 for n in norms) / 3)
    assert stats["noise_std"] == 0.0


def test_central_aggregate_rejects_mismatched_update() -> None:
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="missing"):
        dp.aggregate({"a": torch.zeros(2), "b": torch.zeros(2)}, [{"a": torch.ones(2)}], noise_generator(0, 1))


@pytest.mark.parametrize(("z", "rounds", "delta"), [(1.0, 1, 1e-5), (1.1, 100, 1e-5), (5.0, 1000, 1e-6)])
def test_epsilon_without_subsampling_matches_gaussian_closed_form(z: float, rounds: int, delta: float) -> None:
    # Prepare: with q = 1 each round is the plain Gaussian mechanism, RDP(alpha) = alpha / (2 z^2)
    assert RDPAccountant.DEFAULT_ALPHAS == DEFAULT_ORDERS
    orders = np.array(DEFAULT_ORDERS, dtype=float)
    expected = opacus_conversion(rounds * orders / (2 * z**2), orders, delta)
    accountant = PrivacyAccountant()

    # Execute
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=1.0)

    # Assert
    assert accountant.epsilon(delta) == pytest.approx(expected, rel=1e-9)
    assert accountant.steps == rounds


def test_subsampled_epsilon_matches_abadi_et_al() -> None:
    """Abadi et al. (2016), Sec. 3.1: q=0.01, sigma=4, T=10000, delta=1e-5 gives eps ~= 1.26 (moments accountant).

    The moments accountant is RDP at integer orders with the classic conversion eps = rdp + log(1/delta)/(alpha-1);
    our binomial-sum RDP must give the published 1.26, and the wrapper (opacus' tighter conversion) must agree with it.
    """
    # Prepare
    q, z, rounds, delta = 0.01, 4.0, 10_000, 1e-5
    orders = np.arange(2, 65)
    rdp = np.array([rounds * sgm_rdp_integer(q, z, int(a)) for a in orders])
    accountant = PrivacyAccountant()

    # Execute
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=q)

    # Assert
    assert round(float(np.min(rdp + math.log(1 / delta) / (orders - 1))), 2) == 1.26
    assert accountant.epsilon(delta, orders=orders.tolist()) == pytest.approx(opacus_conversion(rdp, orders, delta),
                                                                              rel=1e-6)
    assert accountant.epsilon(delta) <= 1.26


def test_epsilon_matches_opacus_reference_value() -> None:
    # Prepare: the value opacus' own test suite pins (tests/accountants_test.py::test_rdp_accountant)
    accountant = PrivacyAccountant()

    # Execute
    for _ in range(int(90 / 0.04)):
        accountant.step(noise_multiplier=1.5, sample_rate=0.04)

    # Assert
    assert accountant.epsilon(1e-5) == pytest.approx(7.32911117143, rel=1e-9)


def test_state_dict_round_trip_through_json_keeps_epsilon() -> None:
    # Prepare
    accountant = PrivacyAccountant()
    for _ in range(30):
        accountant.step(noise_multiplier=1.2, sample_rate=0.1)
    accountant.step(noise_multiplier=0.8, sample_rate=0.1)
    restored = PrivacyAccountant()

    # Execute
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))

    # Assert
    assert restored.epsilon(1e-5) == accountant.epsilon(1e-5)
    assert restored.steps == 31
    assert PrivacyAccountant().epsilon(1e-5) == 0.0
