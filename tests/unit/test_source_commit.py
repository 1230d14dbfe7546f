"""A result records the source commit and torch threads that produced it (benchmarks reuse runs across sessions
and commits, and run them in worker processes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedcustom import summary
from fedcustom.bench.sweep import code_line, threads_line

ROOT = Path(summary.__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None,
                    reason="the source is not a git checkout (an installed wheel records no commit)")
def test_the_commit_is_the_checkouts_head_and_says_when_src_differs() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "src"],
                             capture_output=True, text=True, check=True).stdout.strip()
    recorded = summary.versions()["fedcustom_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", recorded)
    assert recorded == head + ("+dirty" if changed else "")


def test_outside_a_checkout_no_commit_is_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "site-packages" / "fedcustom" / "summary.py"  # as in an installed wheel: no .git above
    monkeypatch.setattr(summary, "__file__", str(fake))
    assert summary.source_commit() is None


def test_a_report_counts_its_runs_per_commit() -> None:
    def run(commit: str | None) -> dict:
        return {"summary": {"versions": {"fedcustom_commit": commit} if commit else {}}}

    result = {"stages": {"tune": [run("a" * 40), run("b" * 40 + "+dirty")], "report": [run("a" * 40), run(None)]}}
    assert code_line(result) == (f"2 runs at `{'a' * 12}`; 1 run at `{'b' * 12}+dirty`; "
                                 "1 run that recorded no commit")
    assert code_line({"stages": {}}) == "no runs"


def test_a_report_counts_its_runs_per_torch_thread_count() -> None:
    def run(threads: int | None) -> dict:
        return {"summary": {"torch_threads": threads} if threads else {}}

    result = {"stages": {"tune": [run(1), run(2)], "report": [run(1), run(None), run(None)]}}
    assert threads_line(result) == "1 (2 runs), 2 (1 run), not recorded (2 older runs)"
    assert threads_line({"stages": {}}) == "no runs"
