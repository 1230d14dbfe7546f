"""A saved classification adapter names its classes for someone who has only transformers and PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_LR, toy_rows
from fedcustom.runner import build_job, execute

STRANGER = """
import json, sys
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

adapter = sys.argv[1]
base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
model = AutoModelForSequenceClassification.from_pretrained(base, config=AutoConfig.from_pretrained(adapter))
model = PeftModel.from_pretrained(model, adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter)
with torch.no_grad():
    logits = model(**tokenizer(json.loads(sys.argv[2]), return_tensors="pt", padding=True)).logits
print(json.dumps([model.config.id2label[int(i)] for i in logits.argmax(-1)]))
assert "fedcustom" not in sys.modules
"""


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_a_stranger_with_plain_peft_gets_label_names(method: str, tiny_config, tmp_path: Path) -> None:
    # Prepare: labels that are words, not indices
    rows = toy_rows(120)
    rows["label"] = rows["label"].map({0: "negative", 1: "positive"})
    data = tmp_path / "named.csv"
    rows.to_csv(data, index=False)
    job = build_job(tiny_config(method__name=method, train__lr=TINY_LR[method], data__dataset=str(data),
                                federation__rounds=1))
    execute(job)
    texts = ["the movie was great and lovely", "the plot was awful and dull"]
    batch = job.tokenizer(texts, return_tensors="pt", padding=True)
    job.model.eval()
    with torch.no_grad():
        expected = [job.data.label_names[int(i)] for i in job.model(**batch).logits.argmax(-1)]
    # Execute: a fresh interpreter that never imports fedcustom
    done = subprocess.run([sys.executable, "-c", STRANGER, str(job.model_dir), json.dumps(texts)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    assert set(expected) <= {"negative", "positive"}
    # the weights are readable as any new file under the umask (the safetensors library writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in job.model_dir.glob("*.safetensors"))
