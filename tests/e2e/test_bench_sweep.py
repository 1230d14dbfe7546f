"""Declarative sweeps: axes expanded in order, a stage that picks an axis value from an earlier stage's results,
finished runs reused, interrupted runs resumed, stages run in parts, and the converge report from real (tiny)
runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rich.console import Console

from fedcustom.bench import run_sweep_bench
from fedcustom.bench.sweep import Pick, best_per_group, cells, load_sweep, parse_only, parse_sweep, sweep_names
from fedcustom.config import build_config
from fedcustom.errors import ConfigError
from fedcustom.summary import source_commit

from conftest import TINY_LR, cut_off_in_round

SWEEP = """
name = "tiny-converge"
report = "converge"
[base.model]
name = "{model}"
max_length = 16
[base.data]
dataset = "{data}"
max_eval_examples = 40
[base.method]
num_virtual_tokens = 4
[base.federation]
clients = 2
rounds = 4
local_epochs = 4
early_stop_patience = 2
[base.train]
batch_size = 16
lr = {lr}
lr_schedule = "constant"
centralized_max_epochs = 3
[[axis.setting]]
label = "sst2-iid"
dataset = "sst2"
split = "iid"
[axis.setting.set]
data.partition = "iid"
train.centralized_converged = true
[[axis.setting]]
label = "ag_news-iid"
dataset = "ag_news"
split = "iid"
[axis.setting.set]
data.partition = "iid"
train.centralized_converged = true
[[axis.setting]]
label = "ag_news-dirichlet0.1"
dataset = "ag_news"
split = "dirichlet:0.1"
[axis.setting.set]
data.partition = "dirichlet:0.1"
[[axis.method]]
label = "prefix"
[axis.method.set]
method.name = "prefix"
[[axis.variant]]
label = "frozen"
[axis.variant.set]
train.lr = 1e-12
[[axis.variant]]
label = "fedavg"
[axis.variant.set]
federation.server_opt = "fedavg"
[[axis.seed]]
label = "tune"
[axis.seed.set]
train.seed = 100
[[axis.seed]]
label = "seed0"
[axis.seed.set]
train.seed = 0
[[axis.seed]]
label = "seed1"
[axis.seed.set]
train.seed = 1
[stages.tune]
axis.seed = ["tune"]
axis.setting = ["sst2-iid", "ag_news-dirichlet0.1"]
[stages.tune.set]
train.centralized_converged = false
[stages.report]
axis.seed = ["seed0", "seed1"]
[stages.report.pick]
axis = "variant"
from = "tune"
by = ["method", "dataset"]
metric = "final_accuracy"
"""


@pytest.fixture
def sweep_file(tmp_path: Path, tiny_bert: str, toy_csv: str) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP.replace("{model}", tiny_bert).replace("{data}", toy_csv).replace("{lr}", str(TINY_LR["prefix"])))
    return path


def test_axes_expand_in_order_and_a_pick_takes_the_best_value_per_group(sweep_file: Path) -> None:
    sweep = load_sweep(str(sweep_file))
    tune, report = sweep.stages
    tuning = cells(sweep, tune)
    assert [c.name for c in tuning] == ["sst2-iid/prefix/frozen/tune", "sst2-iid/prefix/fedavg/tune",
                                        "ag_news-dirichlet0.1/prefix/frozen/tune", "ag_news-dirichlet0.1/prefix/fedavg/tune"]
    assert tuning[0].values["train"] == {"batch_size": 16, "lr": 1e-12, "lr_schedule": "constant",
                                         "centralized_max_epochs": 3, "centralized_converged": False, "seed": 100}
    records = [{"labels": c.labels, "tags": c.tags, "summary": {"final_accuracy": score}}
               for c, score in zip(tuning, [0.5, 0.7, 0.6, 0.4])]
    picked = best_per_group(records, sweep, report.pick)
    assert {k: v.label for k, v in picked.items()} == {("prefix", "sst2"): "fedavg", ("prefix", "ag_news"): "frozen"}
    names = [c.name for c in cells(sweep, report, picked)]
    assert names[:2] == ["sst2-iid/prefix/fedavg/seed0", "sst2-iid/prefix/fedavg/seed1"]
    assert "ag_news-dirichlet0.1/prefix/frozen/seed1" in names and len(names) == 6


def test_the_converge_sweep_runs_in_parts_reuses_its_runs_and_reports_targets(sweep_file: Path, tmp_path: Path) -> None:
    # Prepare
    sweep, out = load_sweep(str(sweep_file)), tmp_path / "out"
    out.mkdir()
    # Execute: the tuning stage's SST-2 runs alone (--stage tune --only setting=sst2-iid), then everything (those
    # runs reused), then again (all reused)
    first = run_sweep_bench(sweep, ".", out, "first", Console(quiet=True), stages=["tune"],
                            only=parse_only(sweep, ["setting=sst2-iid"]))
    first_text = (out / "report.md").read_text()
    second = run_sweep_bench(sweep, ".", out, "second", Console(quiet=True))
    third = run_sweep_bench(sweep, ".", out, "third", Console(quiet=True))
    # Assert
    assert first["runs"] == 2 and first["reused"] == 0 and first["stages"]["report"] == []
    assert {r["labels"]["setting"] for r in first["stages"]["tune"]} == {"sst2-iid"}
    assert second["runs"] == 10 and second["reused"] == 2 and third["reused"] == 10
    # the report of a sweep run in parts says so until every run has finished
    assert first["planned"] == second["planned"] == 10
    assert "Partial report: 2 of the sweep's 10 runs have finished" in first_text
    report = [r for r in second["stages"]["report"]]
    assert {r["labels"]["variant"] for r in report if r["tags"]["dataset"] == "sst2"} == {"fedavg"}  # frozen learns nothing
    iid = [r for r in report if r["tags"]["setting"] == "sst2-iid"]
    assert all(r["summary"]["centralized_converged_accuracy"] is not None for r in iid)
    text = (out / "report.md").read_text()
    assert "Partial report" not in text
    commit = source_commit()  # None where the source is not a git checkout
    assert (f"Code: 10 runs at `{commit[:12]}" in text) if commit else ("Code: 10 runs that recorded no commit." in text)
    assert "prefix tuning within 0.5 points" in text and "| prefix | sst2-iid | fedavg | 2 |" in text  # 2 seeds
    assert [t["met"] in (True, False) for t in second["targets"]] == [True, True]
    assert json.loads((out / "results.json").read_text())["preset"] == "tiny-converge"
    assert all((out / name).is_file() for name in ("accuracy_vs_round.png", "accuracy_by_split.png"))


def test_a_stage_does_not_run_on_the_pick_of_an_unfinished_tuning_stage(sweep_file: Path, tmp_path: Path) -> None:
    # Prepare: one of the tune stage's four runs (SST-2, the frozen variant): SST-2's pick would be "frozen" now
    sweep = load_sweep(str(sweep_file))
    run_sweep_bench(sweep, ".", tmp_path, "one tune run", Console(quiet=True), stages=["tune"],
                    only=parse_only(sweep, ["setting=sst2-iid", "variant=frozen"]))
    # Execute / Assert: the report stage, which picks from it, refuses to run on that pick
    with pytest.raises(ConfigError, match=r"picks from stage 'tune', of which 1 of 4 runs have finished"):
        run_sweep_bench(sweep, ".", tmp_path, "report first", Console(quiet=True), stages=["report"])
    # reporting what exists runs nothing, so it is not refused
    run_sweep_bench(sweep, ".", tmp_path, "report only", Console(quiet=True), stages=["none"])


def test_two_invocations_side_by_side_each_report_every_finished_run(sweep_file: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: invocation A runs one tuning cell; while it runs, invocation B (another process on the same folder)
    # finishes another cell and writes its report first
    import fedcustom.bench as bench

    sweep = load_sweep(str(sweep_file))
    mine = parse_only(sweep, ["setting=sst2-iid", "variant=fedavg"])
    theirs = parse_only(sweep, ["setting=sst2-iid", "variant=frozen"])
    run_sweep, others = bench.run_sweep, []

    def side_by_side(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = run_sweep(*args, **kwargs)
        if not others:  # A's own runs are done: B's invocation runs and reports before A reports
            others.append("B")
            run_sweep_bench(sweep, ".", tmp_path, "B", Console(quiet=True), stages=["tune"], only=theirs)
        return result

    monkeypatch.setattr(bench, "run_sweep", side_by_side)
    # Execute
    mine_result = run_sweep_bench(sweep, ".", tmp_path, "A", Console(quiet=True), stages=["tune"], only=mine)
    # Assert: A's report (written last) has both runs, its own as run by it and B's as reused; not A's view at
    # its start (one run), which overwrote B's report
    tune = {r["labels"]["variant"]: r["reused"] for r in mine_result["stages"]["tune"]
            if r["labels"]["setting"] == "sst2-iid"}
    assert tune == {"fedavg": False, "frozen": True} and mine_result["reused"] == 1
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["runs"] == 2 and written["command"] == "A"
    assert not list(tmp_path.glob("*.tmp"))


def test_the_report_lock_holds_a_second_writer_until_the_first_is_done(tmp_path: Path) -> None:
    import threading

    from fedcustom.bench import report_lock

    order: list[str] = []

    def second_writer() -> None:
        with report_lock(tmp_path):
            order.append("second")

    with report_lock(tmp_path):
        second = threading.Thread(target=second_writer)
        second.start()
        second.join(timeout=1.0)  # it waits for the lock
        order.append("first done")
    second.join(timeout=5.0)
    assert order == ["first done", "second"]


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: one tuning cell (4 rounds, early stopping after 2 without gain) run without interruption, and the
    # same cell in another folder cut off after round 2 (as a killed bench: its checkpoint, no summary)
    from fedcustom import runner
    from fedcustom.bench import cells
    from fedcustom.checkpoint import CHECKPOINT, load_checkpoint
    from fedcustom.convergence import local_schedule, resolved_settings
    from fedcustom.deploy.flower.submit import resume_run_config
    from fedcustom.errors import FedCustomError
    from fedcustom.methods import defaults, get_method

    sweep = load_sweep(str(sweep_file))
    only = parse_only(sweep, ["setting=sst2-iid", "variant=fedavg"])
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    run_sweep_bench(sweep, ".", whole, "whole", Console(quiet=True), stages=["tune"], only=only)
    cut_off_in_round(monkeypatch, 3)  # killed after round 2
    with pytest.raises(KeyboardInterrupt):
        run_sweep_bench(sweep, ".", cut, "cut", Console(quiet=True), stages=["tune"], only=only)
    monkeypatch.undo()
    folder = cut / "runs" / "tune" / "sst2-iid" / "prefix" / "fedavg" / "tune"
    checkpoint = load_checkpoint(folder)
    assert checkpoint.round == 2 and not (folder / "summary.json").exists()
    own = build_config(checkpoint.config)
    assert cells.interrupted(folder, own) is not None
    assert cells.interrupted(folder, dataclasses.replace(own, train=dataclasses.replace(own.train, seed=1))) is None
    # a checkpoint records the settings its run resolved: once a default it left unset moves, it is not resumed
    # (the bench starts that run again) and `--resume` says which setting moved
    assert checkpoint.settings == resolved_settings(own, get_method("prefix"), local_schedule(own, get_method("prefix")))
    with monkeypatch.context() as moved:
        moved.setitem(defaults.CLASSIFICATION, "prefix", dataclasses.replace(defaults.CLASSIFICATION["prefix"],
                                                                            server_lr=0.5))
        assert own.federation.server_lr is None and cells.interrupted(folder, own) is None
        with pytest.raises(FedCustomError, match=r"defaults have moved since \(server_lr 1.0 -> 0.5\)"):
            runner.resumed_job(folder)
        with pytest.raises(FedCustomError, match="defaults have moved since"):  # before a deployment submits it
            resume_run_config(str(folder))
    run_sweep_bench(sweep, ".", cut, "report only", Console(quiet=True), stages=["none"], only=only)
    assert ("Partial report: 0 of the sweep's 10 runs have finished** and 1 more is part-way"
            in (cut / "report.md").read_text())
    resumed, resumed_job = [], runner.resumed_job
    monkeypatch.setattr(runner, "resumed_job", lambda *a, **k: resumed.append(a) or resumed_job(*a, **k))
    # Execute
    result = run_sweep_bench(sweep, ".", cut, "resumed", Console(quiet=True), stages=["tune"], only=only)
    # Assert: continued from round 2, not started again, with the uninterrupted run's results; checkpoint gone
    assert resumed == [(folder,)] and result["reused"] == 0
    expected = json.loads((whole / "runs" / "tune" / "sst2-iid" / "prefix" / "fedavg" / "tune" / "summary.json")
                          .read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["accuracy_per_round"] == expected["accuracy_per_round"] and len(expected["accuracy_per_round"]) > 3
    assert summary["final_accuracy"] == expected["final_accuracy"]
    assert summary["early_stop"] == expected["early_stop"]
    assert [json.loads(line)["round"] for line in (folder / "round_log.jsonl").read_text().splitlines()] == \
        list(range(len(expected["accuracy_per_round"])))
    assert not (folder / CHECKPOINT).exists() and not list(whole.rglob(CHECKPOINT))


def test_malformed_sweeps_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        parse_sweep({"name": "x", "report": "converge"})
    with pytest.raises(ConfigError, match="has no value"):
        parse_sweep({"name": "x", "report": "converge", "axis": {"seed": [{"label": "a"}]},
                     "stages": {"s": {"axis": {"seed": ["b"]}}}})
    sweep = load_sweep("converge")
    assert parse_only(sweep, None) is None
    assert parse_only(sweep, ["method=prefix", "method=lora", "setting=ag_news-iid"]) == {
        "method": {"prefix", "lora"}, "setting": {"ag_news-iid"}}
    with pytest.raises(ConfigError, match="expected AXIS=LABEL"):
        parse_only(sweep, ["methods=prefix"])
    with pytest.raises(ConfigError, match=r"axis 'method' has no value \['pefix'\]"):
        parse_only(sweep, ["method=pefix"])
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep("nonexistent-sweep")
    assert "converge" in sweep_names()
    assert Pick("variant", "tune", ("method",), "final_accuracy").axis == "variant"


def test_the_personalize_sweep_reports_each_mode_against_fedavg(tmp_path: Path, tiny_bert: str, toy_csv: str) -> None:
    # Prepare: the shipped sweep's axes and stages on tiny BERT and the toy corpus
    import tomllib

    from fedcustom.bench.sweep import SWEEPS_DIR

    raw = tomllib.loads((SWEEPS_DIR / "personalize.toml").read_text())
    raw["base"] = {"model": {"name": tiny_bert, "max_length": 16}, "data": {"dataset": toy_csv, "max_eval_examples": 40},
                   "method": {"num_virtual_tokens": 4},
                   "federation": {"clients": 3, "rounds": 2, "local_epochs": 2, "client_eval_fraction": 0.25},
                   "train": {"batch_size": 16, "seed": 0}}
    sweep, out = parse_sweep(raw, str(SWEEPS_DIR / "personalize.toml")), tmp_path / "out"  # {sweep_dir}: its folder
    out.mkdir()
    # Execute: the skewed, ranks, lengths and local stages
    result = run_sweep_bench(sweep, ".", out, "fedcustom bench --preset personalize", Console(quiet=True),
                             stages=["skewed", "ranks", "lengths", "local"])
    # Assert: one run per variant (local-only at both skews), each scored with the global and the clients' own
    # models; targets per method
    runs = result["stages"]["skewed"] + result["stages"]["ranks"] + result["stages"]["lengths"]
    local = result["stages"]["local"]
    assert [r["labels"]["variant"] for r in runs + local[:2]] == [v.label for v in sweep.axes["variant"]
                                                                   if v.label not in ("lora-local", "prefix-local")] + \
        ["lora-local", "prefix-local"]
    assert [r["labels"]["split"] for r in local] == ["dirichlet0.1", "dirichlet0.1", "dirichlet1.0", "dirichlet1.0"]
    runs += local
    assert all(0 <= r["summary"]["client_accuracy_personal_mean"] <= 1 for r in runs)
    assert [t["target"].split(":")[0] for t in result["targets"]] == ["lora", "prefix", "lora-ranks"]
    text = (out / "report.md").read_text()
    assert "| dual-lora | dirichlet0.1 |" in text and "| ranks-svd | dirichlet0.1 |" in text
    assert "The ranks-* rows:" in text  # explained where they are, and only there:
    from fedcustom.bench.personalize import report

    skewed_only = report(sweep, {"skewed": result["stages"]["skewed"]}, {**result, "targets": []}, tmp_path)
    assert "| dual-lora | dirichlet0.1 |" in skewed_only and "The ranks-* rows:" not in skewed_only
    # Assert: local-only training, nothing uploaded, is compared with FedAvg and the best personalization mode
    assert all(r["summary"]["bytes_up_per_round"] < 1000 for r in local)
    assert "## Against local-only training" in text and "| prefix | dirichlet1.0 |" in text
    # Assert: the lengths stage ran on the device profiles beside the sweep, and its table compares the two
    assert all(r["summary"]["simulated_seconds_total"] > 0 for r in result["stages"]["lengths"])
    assert "## Prefix lengths on three device classes" in text and "| prefix-adaptive-devices |" in text
    assert (out / "personalize_client_accuracy.png").read_bytes()[:4] == b"\x89PNG"
