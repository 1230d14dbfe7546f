"""The converge report's setup section says what the sweep file ran, not what an earlier version of it did."""

from __future__ import annotations

import dataclasses

from fedcustom.bench.converge import setup_lines
from fedcustom.bench.sweep import load_sweep


def _setup(sweep) -> str:
    return "\n".join(setup_lines(sweep, ["seed0", "seed1", "seed2"]))


def test_the_tuning_line_names_the_tune_stages_seed_and_settings_and_the_pick_scope() -> None:
    sweep = load_sweep("converge")
    text = _setup(sweep)
    assert ("picked by final_accuracy on the `tune` stage's runs: seed 100, setting sst2-iid, not reported "
            "(one pick per method, used on every setting)") in text
    assert "Dirichlet 0.1 runs" not in text
    # a tune stage over two settings, picking per method and setting, reads so
    stages = tuple(dataclasses.replace(s, only={**s.only, "setting": ("sst2-iid", "ag_news-dirichlet0.1")})
                   if s.name == "tune" else dataclasses.replace(s, pick=dataclasses.replace(s.pick, by=("method", "setting")))
                   if s.pick is not None else s for s in sweep.stages)
    wider = _setup(dataclasses.replace(sweep, stages=stages))
    assert "seed 100, setting sst2-iid, ag_news-dirichlet0.1, not reported (one pick per method and setting)" in wider


def test_the_centralized_line_follows_the_sweeps_baseline_settings() -> None:
    sweep = load_sweep("converge")
    assert "on a 10% validation slice" in _setup(sweep) and "for 3 epochs (at most 20)" in _setup(sweep)
    train = {**sweep.base.get("train", {}), "centralized_val_fraction": 0.25, "centralized_patience": 5,
             "centralized_max_epochs": 30}
    steadier = dataclasses.replace(sweep, base={**sweep.base, "train": train})
    assert "on a 25% validation slice" in _setup(steadier) and "for 5 epochs (at most 30)" in _setup(steadier)
