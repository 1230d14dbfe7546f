"""Membership inference (issue 24, the leakage preset): the attack scores, and the measurement of a run's global
model and of one client's observed upload."""

from __future__ import annotations

import numpy as np
import torch

from fedcustom.attacks_mia import attacks, score_attack
from fedcustom.bench.leakage import measure, method_targets
from fedcustom.bench.sweep import cells, load_sweep
from fedcustom.methods import trainable_state
from fedcustom.runner import build_job, execute


def test_separated_scores_give_auc_1_and_identical_ones_chance() -> None:
    rng = np.random.default_rng(0)
    perfect = score_attack(np.arange(10, 20.0), np.arange(0, 10.0))
    same = score_attack(rng.normal(size=2000), rng.normal(size=2000))
    assert perfect.auc == 1.0 and perfect.tpr_at_1pct_fpr == 1.0
    assert abs(same.auc - 0.5) < 0.03 and same.tpr_at_1pct_fpr < 0.05


def test_the_reference_attack_calibrates_away_how_hard_a_row_is() -> None:
    # members' losses are only slightly lower than the reference's; non-members' equal it; raw losses overlap
    rng = np.random.default_rng(1)
    difficulty_in, difficulty_out = rng.exponential(size=500), rng.exponential(size=500)
    result = attacks((difficulty_in - 0.1, difficulty_out), (difficulty_in, difficulty_out))
    assert result["reference_ratio"].auc == 1.0
    assert result["loss_threshold"].auc < 0.6


def test_a_runs_global_model_and_one_clients_upload_are_measured(tiny_config) -> None:
    # Prepare: a short run that trains hard on few rows
    job = build_job(tiny_config(method__name="lora", federation__rounds=2, federation__local_epochs=8,
                                train__lr=0.01))
    execute(job)
    final = trainable_state(job.model)
    # Execute
    result = measure(job)
    # Assert: both targets, both attacks, on the right rows; the model is left with the run's final state
    for target, members in (("global_model", len(job.data.train)), ("client_update", len(job.data.client_table(0)))):
        for attack in ("loss_threshold", "reference_ratio"):
            scored = result[target][attack]
            assert scored["members"] == members and scored["non_members"] == len(job.data.test)
            assert 0.0 <= scored["auc"] <= 1.0
    assert result["mean_loss"]["members"] < result["mean_loss"]["non_members"] + 1.0
    for name, tensor in trainable_state(job.model).items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=0)


def test_targets_name_the_smallest_cheap_epsilon_or_say_none_was_cheap() -> None:
    leak = lambda auc: {"global_model": {"loss_threshold": {"auc": auc}, "reference_ratio": {"auc": auc}}}  # noqa: E731
    records = [{"method": "lora", "noise": 0.0, "epsilon": None, "accuracy": 0.80, "leakage": leak(0.70)},
               {"method": "lora", "noise": 1.0, "epsilon": 8.0, "accuracy": 0.79, "leakage": leak(0.53)},
               {"method": "lora", "noise": 3.0, "epsilon": 2.0, "accuracy": 0.70, "leakage": leak(0.50)},
               {"method": "full", "noise": 0.0, "epsilon": None, "accuracy": 0.80, "leakage": leak(0.70)},
               {"method": "full", "noise": 1.0, "epsilon": 8.0, "accuracy": 0.60, "leakage": leak(0.50)}]
    lines = method_targets(records)
    assert lines[0].startswith("- lora: smallest epsilon within 2 points of accuracy: 8.00") and lines[0].endswith("met")
    assert lines[1].startswith("- full: no noise level") and lines[1].endswith("missed")


def test_a_report_of_a_preset_run_in_parts_names_the_runs_it_lacks() -> None:
    from fedcustom.bench.leakage import _missing_lines

    sweep = load_sweep("leakage")
    planned = [{"method": c.labels["method"], "noise": c.tags["noise_multiplier"]}
               for stage in sweep.stages for c in cells(sweep, stage)]
    assert len(planned) == 18 and {p["method"] for p in planned} == {"prefix", "lora", "full"}
    finished = [p for p in planned if p["method"] == "prefix"]
    line = _missing_lines(sweep, finished)[0]
    assert line.startswith("Not run yet") and "lora noise 0," in line and "prefix" not in line
    assert _missing_lines(sweep, planned) == []
