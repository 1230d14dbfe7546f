"""The codecs bench report from a sweep run in parts: a chain whose seed's raw run has not finished is shown with
n/a for its comparisons with raw instead of stopping the report (it raised KeyError, writing no report at all)."""

from __future__ import annotations

import pytest

from fedcustom.bench.codecs import RAW, row_targets, rows, table


def _record(chain: str, seed: int, final: float, up: float) -> dict:
    return {"method": "full", "chain": chain, "seed": seed, "codec_up": chain, "final_accuracy": final,
            "accuracy_per_round": [0.5, final], "bytes_up_per_round": up, "bytes_down_per_round": up,
            "bytes_per_round_all_clients": [2 * up]}


def test_a_chain_without_its_raw_partner_reads_n_a_and_the_paired_one_is_compared() -> None:
    # Prepare: raw finished for seed 0 only; the int8 chain for seeds 0 and 1
    records = [_record(RAW, 0, 0.80, 4e6), _record("int8", 0, 0.79, 1e6), _record("int8", 1, 0.78, 1e6),
               _record("zstd", 1, 0.80, 3e6)]
    # Execute
    result = {r["chain"]: r for r in rows(records)}
    text = table(list(result.values()))
    # Assert: int8 compared on seed 0 only (-1.0 points, 4x); zstd has no partner yet
    assert result["int8"]["delta_points"] == pytest.approx(-1.0) and result["int8"]["up_reduction"] == 4.0
    assert result["zstd"]["delta_points"] is None and "| full | zstd | 80.0 | n/a |" in text
    assert "n/a | n/a |" in text.splitlines()[-1]
    assert "int8" in row_targets(list(result.values()))[0]["measured"]
