"""Exact aggregation of LoRA adapters with different ranks: stacking equals the weighted sum of B_k A_k, averaging
the factors does not, and SVD truncation to full rank loses nothing."""

from __future__ import annotations

import pytest
import torch

from fedcustom.strategies.lora_ranks import ClientLora, padded_average, stack, truncate, weighted_delta


def _clients(ranks: list[int], seed: int = 0, out: int = 12, inp: int = 10) -> list[ClientLora]:
    gen = torch.Generator().manual_seed(seed)
    return [ClientLora(torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen), scaling=16 / r,
                       weight=float(w)) for r, w in zip(ranks, [30, 10, 60, 25])]


@pytest.mark.parametrize("ranks", [[4, 8, 16], [2, 2], [1, 8, 3, 5]])
def test_the_stacked_aggregate_is_the_weighted_sum_of_the_products(ranks: list[int]) -> None:
    clients = _clients(ranks)
    a, b = stack(clients)
    assert a.shape[0] == b.shape[1] == sum(ranks)
    torch.testing.assert_close(b @ a, weighted_delta(clients), rtol=0, atol=1e-6)
    # the target by hand, so that it is checked too
    total = sum(c.weight for c in clients)
    manual = sum(c.weight / total * c.scaling * c.b.double() @ c.a.double() for c in clients)
    torch.testing.assert_close(weighted_delta(clients), manual, rtol=0, atol=1e-9)


def test_averaging_the_factors_is_not_the_average_of_the_products() -> None:
    clients = _clients([4, 8, 16])
    a, b = padded_average(clients)
    scaling = clients[0].scaling  # whichever scaling a rank-agnostic server would apply
    error = (scaling * b @ a - weighted_delta(clients)).abs().max().item()
    assert error > 1.0  # far from exact (the stacked error is below 1e-6)


def test_svd_truncation_to_full_rank_is_exact_and_lower_ranks_are_the_best_approximation() -> None:
    clients = _clients([4, 8, 16])
    delta = weighted_delta(clients)
    full = min(delta.shape)
    a, b = truncate(delta, full, scaling=2.0)
    torch.testing.assert_close(2.0 * b @ a, delta, rtol=0, atol=1e-6)
    a4, b4 = truncate(delta, 4, scaling=4.0)
    s = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(4.0 * b4 @ a4 - delta).item()
    assert error == pytest.approx(s[4:].square().sum().sqrt().item(), rel=1e-6)  # Eckart-Young
    a_big, _ = truncate(delta, full + 3, scaling=1.0)  # more rank than the matrix has: zero rows, still exact
    assert a_big.shape[0] == full + 3 and torch.count_nonzero(a_big[full:]) == 0


def test_malformed_factors_are_refused() -> None:
    with pytest.raises(ValueError, match="A \\(r x in\\) and B \\(out x r\\)"):
        ClientLora(torch.zeros(4, 10), torch.zeros(12, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="positive weight"):
        stack([])
