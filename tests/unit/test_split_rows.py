"""Split learning's changed-rows exchange: exact round trips, whole tensors past half their rows, and malformed
payloads refused with the reason; the server's version history builds on what a node keeps."""

from __future__ import annotations

import pytest
import torch

from fedcustom.errors import PayloadError
from fedcustom.protocols.split.rows import INDEX, VALUES, VersionHistory, changed_rows, decode_rows, encode_rows


def _base() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"emb": torch.randn(100, 8, generator=gen), "norm": torch.randn(8, generator=gen),
            "scale": torch.tensor(2.0), "ids": torch.arange(6)}


def _trained(base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Three embedding rows and every element of the norm changed; the rest as it was."""
    new = {k: v.clone() for k, v in base.items()}
    new["emb"][[3, 50, 99]] += 0.5
    new["norm"] += 1e-7 * torch.ones(8) + new["norm"].abs() * 1e-6
    return new


def test_rows_round_trip_exactly_with_only_the_changed_rows_on_the_wire() -> None:
    # Prepare
    base = _base()
    new = _trained(base)
    # Execute
    rows = changed_rows(new, base)
    wire = encode_rows(new, rows)
    back = decode_rows(base, wire)
    # Assert: three rows of the embedding, the norm whole (every element changed), nothing else travels
    assert rows["emb"].nonzero().flatten().tolist() == [3, 50, 99]
    assert wire[INDEX + "emb"].tolist() == [3, 50, 99] and wire[VALUES + "emb"].shape == (3, 8)
    assert set(wire) == {INDEX + "emb", VALUES + "emb", "norm"}
    assert back.keys() == new.keys() and all(torch.equal(back[k], new[k]) for k in new)
    assert back["scale"] is base["scale"]  # unchanged tensors are the base's own, not copies


def test_a_bit_flip_counts_as_a_change_and_zero_signs_are_kept() -> None:
    # Prepare: -0.0 == 0.0 as numbers but not as bits; the receiver must get exactly the sender's
    base = {"w": torch.zeros(4, 2)}
    new = {"w": torch.tensor([[0.0, -0.0], [0.0, 0.0], [1e-45, 0.0], [0.0, 0.0]])}
    # Execute
    back = decode_rows(base, encode_rows(new, changed_rows(new, base)))
    # Assert
    assert changed_rows(new, base)["w"].tolist() == [True, False, True, False]
    assert torch.equal(back["w"].view(torch.int32), new["w"].view(torch.int32))


def test_a_tensor_with_more_than_half_its_rows_changed_travels_whole_and_an_unchanged_one_not_at_all() -> None:
    base = {"a": torch.zeros(10, 3), "b": torch.zeros(10, 3), "c": torch.zeros(10, 3)}
    new = {"a": base["a"].clone(), "b": base["b"].clone(), "c": base["c"]}
    new["a"][:6] = 1.0  # 6 of 10 rows
    new["b"][:5] = 1.0  # 5 of 10 rows: at the line, still rows
    wire = encode_rows(new, changed_rows(new, base))
    assert set(wire) == {"a", INDEX + "b", VALUES + "b"}


@pytest.mark.parametrize("wire, reason", [
    ({"other": torch.zeros(3)}, "does not have"),
    ({INDEX + "emb": torch.tensor([100]), VALUES + "emb": torch.zeros(1, 8)}, r"lie in \[0, 100\)"),
    ({INDEX + "emb": torch.tensor([-1]), VALUES + "emb": torch.zeros(1, 8)}, r"lie in \[0, 100\)"),
    ({INDEX + "emb": torch.tensor([1.0]), VALUES + "emb": torch.zeros(1, 8)}, "int64"),
    ({INDEX + "emb": torch.tensor([1, 2]), VALUES + "emb": torch.zeros(1, 8)}, r"expected \(2, 8\)"),
    ({INDEX + "emb": torch.tensor([1])}, "without"),
    ({VALUES + "emb": torch.zeros(1, 8)}, "without their row indices"),
    ({"norm": torch.zeros(9)}, r"expected \(8,\)"),
    ({"norm": torch.zeros(8, dtype=torch.float64)}, "float64"),
    ({INDEX + "scale": torch.tensor([0]), VALUES + "scale": torch.zeros(1)}, "with rows"),
])
def test_malformed_rows_are_refused_naming_the_tensor(wire, reason) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode_rows(_base(), wire)


def test_the_version_history_sends_the_rows_changed_since_the_version_a_node_keeps() -> None:
    # Prepare: three versions; node 1 keeps version 0, node 2 version 2, node 3 none
    history = VersionHistory("t", keep=2)
    v0 = {"w": torch.zeros(6, 2)}
    v1 = {"w": v0["w"].clone()}
    v1["w"][1] = 1.0
    v2 = {"w": v1["w"].clone()}
    v2["w"][4] = 2.0
    history.kept(1, 0)
    history.advance(v1, v0)
    history.advance(v2, v1)
    history.kept(2, 2)
    # Execute
    since = {node: history.rows_since(node) for node in (1, 2, 3)}
    # Assert: node 1 gets rows 1 and 4 (both rounds), node 2 none, node 3 has nothing to build on
    assert history.current == "t:2"
    assert since[1][0] == "t:0" and since[1][1]["w"].nonzero().flatten().tolist() == [1, 4]
    assert since[2][0] == "t:2" and encode_rows(v2, since[2][1]) == {}
    assert since[3] is None
    assert torch.equal(decode_rows(v0, encode_rows(v2, since[1][1]))["w"], v2["w"])
    # Execute: a third round pushes version 1's changes out of a history of two, and node 1 forgets
    history.advance({"w": v2["w"] + 1}, v2)
    history.kept(2, None)
    # Assert: node 1's version 0 is too old to build on; node 2 keeps nothing now
    assert history.rows_since(1) is None and history.rows_since(2) is None
