"""The converge sweep's all-rounds stage: prefix tuning's AG News cells run again without early stopping, and the
report section that sets its IID -> Dirichlet 0.1 drop beside the early-stopped one."""

from __future__ import annotations

from fedcustom.bench.converge import all_rounds_lines
from conftest import converge_stage_cells


def _record(setting: str, seed: str, per_round: list[float]) -> dict:
    return {"tags": {"method": "prefix", "setting": setting, "seed": seed},
            "summary": {"accuracy_per_round": per_round, "final_accuracy": per_round[-1], "rounds": len(per_round) - 1}}


def test_the_shipped_stage_runs_prefix_on_both_ag_news_splits_for_every_round_with_the_tuned_variant() -> None:
    runs = converge_stage_cells("all-rounds")
    assert [c.name for c in runs] == [f"{setting}/prefix/scaffold/seed{i}" for setting in
                                      ("ag_news-iid", "ag_news-dirichlet0.1") for i in range(3)]
    for cell in runs:
        fed = cell.values["federation"]
        assert fed["early_stop_patience"] >= fed["rounds"] == 15  # never stops before the last round
        assert cell.values["train"]["centralized_converged"] is False and fed["scaffold"] is True


def test_the_section_sets_the_drop_without_early_stopping_beside_the_early_stopped_one() -> None:
    # Prepare: early-stopped IID 0.86/0.88/0.90 and Dirichlet 0.1 0.80/0.84/0.80 (seeds 0-2; drops 6 and 4 points
    # on seeds 0 and 1); all rounds, seeds 0 and 1 only: IID 0.87/0.87, Dirichlet 0.1 0.85/0.86 (drops 2 and 1),
    # its best round 2 in seed0 (0.86). Seed 2 has no all-rounds run yet, so no row counts it
    early = [_record("ag_news-iid", "seed0", [0.2, 0.86]), _record("ag_news-iid", "seed1", [0.2, 0.85, 0.88]),
             _record("ag_news-iid", "seed2", [0.2, 0.90]),
             _record("ag_news-dirichlet0.1", "seed0", [0.2, 0.80]),
             _record("ag_news-dirichlet0.1", "seed1", [0.2, 0.84]), _record("ag_news-dirichlet0.1", "seed2", [0.2, 0.80])]
    full = [_record("ag_news-iid", "seed0", [0.2, 0.85, 0.87, 0.87]),
            _record("ag_news-iid", "seed1", [0.2, 0.86, 0.87, 0.87]),
            _record("ag_news-dirichlet0.1", "seed0", [0.2, 0.7, 0.86, 0.85]),
            _record("ag_news-dirichlet0.1", "seed1", [0.2, 0.7, 0.8, 0.86])]
    # Execute
    text = "\n".join(all_rounds_lines({"report": early, "all-rounds": full}))
    partial = "\n".join(all_rounds_lines({"report": early, "all-rounds": full[:1]}))
    # Assert
    assert "| prefix | ag_news-iid | seed0, seed1 | 1.5 ± 0.5 | 87.0 ± 1.0 | 87.0 ± 0.0 | 2.0 ± 0.0 | 87.0 ± 0.0 |" in text
    assert ("| prefix | ag_news-dirichlet0.1 | seed0, seed1 | 1.0 ± 0.0 | 82.0 ± 2.0 | 85.5 ± 0.5 | 2.5 ± 0.5 "
            "| 86.0 ± 0.0 |") in text
    assert "| prefix | seed0, seed1 | 5.0 ± 1.0 | 1.5 ± 0.5 |" in text
    # one all-rounds run so far: its row against the same seed's early-stopped run; no drop without both splits
    assert "| prefix | ag_news-iid | seed0 | 1.0 | 86.0 | 87.0 | 2.0 | 87.0 |" in partial
    assert "| prefix | ag_news-dirichlet0.1 | - | n/a | n/a | n/a | n/a | n/a |" in partial
    assert "| prefix | - | n/a | n/a |" in partial
    assert all_rounds_lines({"report": early}) == []  # no section before the stage has a run
