"""Membership inference: how much a trained model, or one client's uploaded update, tells about which rows it was
trained on. Two attacks, each scoring every candidate row (higher: "a member"):

- loss threshold (Yeom et al., CSF 2018): the row's loss under the target, negated;
- reference-model likelihood ratio (as Mireshghallah et al., EMNLP 2022, do for fine-tuned language models, with
  the pretrained model as the reference; the offline LiRA of Carlini et al., S&P 2022, with one reference model
  and a shared variance): the row's loss under the reference minus its loss under the target, which calibrates
  away how hard the row is in itself. The reference is the run's round-0 model (the pretrained backbone with the
  initial head or prompt), which saw none of the rows.

Reported as ROC AUC and TPR at 1% FPR over an equal number of members and non-members (held-out rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

FPR_AT = 0.01


@torch.no_grad()
def per_example_losses(model: nn.Module, table: Any, tokenizer: Any, batch_size: int) -> np.ndarray:
    """Cross-entropy of each row of a tokenized classification table under ``model`` (in eval mode)."""
    from fedcustom.data.features import make_loader
    from fedcustom.device import model_device, to_device

    was_training = model.training
    model.eval()
    device = model_device(model)
    losses = []
    for batch in make_loader(table, tokenizer, batch_size, None):
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        losses.append(nn.functional.cross_entropy(logits.float(), labels, reduction="none").cpu())
    model.train(was_training)
    return torch.cat(losses).numpy() if losses else np.zeros(0)


@dataclass(frozen=True)
class AttackResult:
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int


def score_attack(member_scores: np.ndarray, non_member_scores: np.ndarray) -> AttackResult:
    """ROC AUC and the TPR at 1% FPR of scores where members should score higher."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    scores = np.concatenate([member_scores, non_member_scores])
    fpr, tpr, _ = roc_curve(labels, scores)
    return AttackResult(float(roc_auc_score(labels, scores)), float(np.max(tpr[fpr <= FPR_AT], initial=0.0)),
                        len(member_scores), len(non_member_scores))


def attacks(target: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> dict[str, AttackResult]:
    """Both attacks from per-row losses (members, non-members) under the target and under the reference."""
    (t_in, t_out), (r_in, r_out) = target, reference
    return {"loss_threshold": score_attack(-t_in, -t_out),
            "reference_ratio": score_attack(r_in - t_in, r_out - t_out)}
