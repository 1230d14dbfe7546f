"""The converge sweep's scaffold-examples stage: the AG News Dirichlet 0.1 cells again with SCAFFOLD's control
variate weighted by examples, and the report section that sets them beside the report stage's uniform rule."""

from __future__ import annotations

from fedcustom.bench.converge import scaffold_weights_lines
from conftest import converge_stage_cells


def _record(method: str, setting: str, seed: str, final: float) -> dict:
    return {"tags": {"method": method, "setting": setting, "seed": seed},
            "summary": {"accuracy_per_round": [0.2, final], "final_accuracy": final, "rounds": 1}}


def test_the_shipped_stage_runs_every_method_on_dirichlet_0_1_with_weighted_scaffold() -> None:
    runs = converge_stage_cells("scaffold-examples")
    assert [c.name for c in runs] == [f"ag_news-dirichlet0.1/{m}/scaffold/seed{i}"
                                      for m in ("full", "lora", "prompt", "prefix") for i in range(3)]
    for cell in runs:
        fed = cell.values["federation"]
        assert fed["scaffold"] is True and fed["scaffold_weights"] == "examples"
        assert cell.values["train"]["centralized_converged"] is False


def test_the_section_pairs_the_weighted_runs_with_the_uniform_ones_by_seed() -> None:
    # Prepare: report stage: LoRA IID 0.87/0.86/0.86, Dirichlet 0.1 (uniform c) 0.84/0.24/0.77 (seeds 0-2);
    # weighted c so far: seeds 0 and 1, 0.85 and 0.84
    report = [_record("lora", "ag_news-iid", f"seed{i}", a) for i, a in enumerate([0.87, 0.86, 0.86])]
    report += [_record("lora", "ag_news-dirichlet0.1", f"seed{i}", a) for i, a in enumerate([0.84, 0.24, 0.77])]
    weighted = [_record("lora", "ag_news-dirichlet0.1", "seed0", 0.85), _record("lora", "ag_news-dirichlet0.1", "seed1", 0.84)]
    # Execute
    text = "\n".join(scaffold_weights_lines({"report": report, "scaffold-examples": weighted}))
    # Assert: seeds 0-1 only: uniform 54.0 ± 30.0, weighted 84.5 ± 0.5; drops 3 and 62 (uniform), 2 and 2 (weighted)
    assert "| lora | seed0, seed1 | 54.0 ± 30.0 | 84.5 ± 0.5 | 32.5 ± 29.5 | 2.0 ± 0.0 |" in text
    assert scaffold_weights_lines({"report": report}) == []  # no section before the stage has a run
