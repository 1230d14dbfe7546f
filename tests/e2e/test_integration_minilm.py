"""Integration: the real packaged MiniLM, at the methods' default settings, learns far beyond the majority class on a
6-class corpus no default was tuned on; its adapter loads with plain PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedcustom.models import resolve_model

pytestmark = pytest.mark.integration


def _eval_label_shares(summary: dict) -> list[float]:
    """Label shares of the held-out set (stratified like the training rows)."""
    totals = [sum(c["label_histogram"][i] for c in summary["client_data"]) for i in range(len(summary["label_names"]))]
    return [t / sum(totals) for t in totals]


def chatterbot_topics(path: Path) -> Path:
    """The 6-topic chatterbot CSV of benchmarks/defaults (a corpus no default was tuned on)."""
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "defaults" / "topics_csv.py"
    return runpy.run_path(str(script))["chatterbot_topics"](path)


def test_a_new_users_run_with_only_the_basic_flags_learns(tmp_path: Path) -> None:
    """Issue 17's scenario: only --method, --model, --dataset, --clients, --rounds and --partition (plus the sizes of
    a quick run: 400 rows, texts of about 25 tokens cut at 32) on a 6-class corpus; every training setting comes from
    the method's recommended defaults."""
    from fedcustom.cli import main

    # Prepare
    data = chatterbot_topics(tmp_path / "topics.csv")
    # Execute
    code = main(["run", "--method", "lora", "--model", "minilm", "--dataset", str(data), "--clients", "10",
                 "--rounds", "2", "--partition", "dirichlet:0.5", "--max-train-examples", "400",
                 "--max-eval-examples", "200", "--max-length", "32", "--output", str(tmp_path / "out"), "--quiet",
                 "--no-count-flops"])
    # Assert: far above the majority class after 2 rounds (0.875 vs 0.615 when written); the defaults are on record
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    majority = max(_eval_label_shares(summary))
    assert summary["final_accuracy"] > majority + 0.15, (summary["accuracy_per_round"], majority)
    assert summary["settings"]["local_epochs"] == 3 and summary["settings"]["lr_schedule"] == "cosine"
    log = [json.loads(line) for line in (tmp_path / "out" / "round_log.jsonl").read_text().splitlines()]
    assert log[-1]["eval_loss"] < log[0]["eval_loss"]
    # Assert: the adapter loads with plain PEFT on the same backbone, with the run's six labels; it names that
    # backbone by its Hub id, not by where the package put it on this machine
    adapter = tmp_path / "out" / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=6)
    PeftModel.from_pretrained(base, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model("minilm") not in (adapter / "README.md").read_text()
