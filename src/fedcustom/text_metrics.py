"""Metrics for generated text: exact match and ROUGE-L (Lin, 2004) via Google's ``rouge-score``.

Both return the mean over (prediction, reference) pairs, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from fedcustom.errors import FedCustomError


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: expected one each")
    if not predictions:
        raise ValueError("no predictions to score")


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped; punctuation is kept."""
    return " ".join(text.lower().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after ``normalize`` (case and whitespace only)."""
    _check_pairs(predictions, references)
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


@cache
def _rouge_l_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise FedCustomError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure: longest common subsequence of tokens, no stemming.

    rouge-score's own tokenizer is used (as in published numbers): it lower-cases and keeps only
    runs of ASCII letters and digits, so punctuation is ignored and text with no such characters
    (including an empty string) scores 0.
    """
    _check_pairs(predictions, references)
    scorer = _rouge_l_scorer()
    # rouge-score's argument order is (target, prediction)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)
