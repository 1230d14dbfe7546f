"""`fedcustom report DIR` and the report a run writes at its end: the numbers of summary.json and the round log, four
real PNGs, and one self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg

from conftest import TINY_LR
from fedcustom.cli import main
from fedcustom.run_report import PLOTS
from fedcustom.runner import build_job, execute


def test_a_run_writes_its_report_and_the_command_rewrites_it_with_html(tiny_config, capsys) -> None:
    # Prepare / Execute: a run with its report on (the test fixtures turn it off)
    job = build_job(tiny_config(method__name="lora", train__lr=TINY_LR["lora"], output__report=True,
                                train__centralized=True, federation__clients=3, federation__rounds=2))
    summary = execute(job)
    out = job.out
    # Assert: the markdown carries the run's own numbers, and every plot is a real image
    text = (out / "report.md").read_text()
    assert f"| final accuracy | {summary['final_accuracy']:.4f} |" in text
    assert f"| centralized accuracy (same passes) | {summary['centralized_accuracy']:.4f} |" in text
    records = [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]
    for record in records:
        assert f"| {record['round']} | {record['eval_accuracy']:.4f} |" in text
    assert "| MB up (all clients) | MB down (all clients) |" in text  # the per-round sums, not per client
    for file in PLOTS.values():
        image = mpimg.imread(out / file)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # not blank
        assert f"]({file})" in text
    # Execute: the command on the finished folder, with --html
    (out / "report.md").unlink()
    assert main(["report", str(out), "--html"]) == 0
    page = (out / "report.html").read_text()
    # Assert: one page, images inlined, the same table
    assert page.count("data:image/png;base64,") == len(PLOTS) and "src=\"http" not in page
    assert f"<td>{summary['final_accuracy']:.4f}</td>" in page
    assert (out / "report.md").is_file() and str(out / "report.html") in capsys.readouterr().out


def test_a_number_nothing_measured_shows_as_a_dash_not_zero() -> None:
    # e.g. no client ever replied: summary.json holds null for the mean upload (it once read "0.00 / 0.00")
    from fedcustom.run_report import overview_rows

    rows = dict(overview_rows({"method": "lora", "bytes_up_per_round": None, "bytes_down_per_round": 2e6,
                               "client_flops_per_round": None, "config": {}}))
    assert rows["MB up / down per client per round"] == "- / 2.00" and rows["client GFLOPs per round"] == "-"


def test_report_on_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json and round_log.jsonl" in capsys.readouterr().err
