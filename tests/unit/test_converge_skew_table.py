"""The converge report's label-skew table says over how many seeds each column and the paired drop are taken: while
the bench runs they differ, and the columns' difference is then not the drop."""

from __future__ import annotations

from fedcustom.bench.converge import skew_table


def _record(setting: str, seed: str, final: float) -> dict:
    return {"tags": {"method": "prompt", "setting": setting, "seed": seed}, "summary": {"final_accuracy": final}}


def test_each_column_and_the_paired_drop_name_their_seed_count() -> None:
    # Prepare: IID on three seeds (0.86, 0.87, 0.88), Dirichlet 0.1 on seed 0 only (0.83): the columns differ by 4.0,
    # the paired drop is 3.0
    records = [_record("ag_news-iid", f"seed{i}", a) for i, a in enumerate([0.86, 0.87, 0.88])]
    records.append(_record("ag_news-dirichlet0.1", "seed0", 0.83))
    # Execute
    table = skew_table(records)
    # Assert
    assert "| prompt | 87.0 ± 0.6 [3] | 83.0 [1] | 3.0 [1] |" in table
