"""recall@k and MRR rank the gold passage against every distinct candidate; a tie or a non-finite score counts
against it, so a collapsed or diverged encoder cannot score perfectly (it once did: ties ranked the gold first)."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from fedcustom.rag.contrastive import retrieval_metrics


class Pad:
    """The tokenizer's pad(), all retrieval_metrics asks of it."""

    def pad(self, rows: list[dict], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class Encoder(torch.nn.Module):
    """Embeds a token id list by a rule: 'right' (a question and its passage coincide), 'constant' or 'nan'."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.anchor = kind, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels=None) -> SimpleNamespace:
        n = input_ids.shape[0]
        if self.kind == "right":  # the first token is i for question i and 100 + i for its passage
            embeddings = torch.nn.functional.one_hot(input_ids[:, 0] % 100, 40).float()
        else:
            embeddings = torch.full((n, 40), float("nan") if self.kind == "nan" else 0.5)
        return SimpleNamespace(embeddings=embeddings, loss=torch.tensor(0.0))


PAIRS = datasets.Dataset.from_dict({
    "input_ids": [[i, 7] for i in range(40)], "attention_mask": [[1, 1]] * 40,
    "passage_input_ids": [[100 + i, 8] for i in range(40)], "passage_attention_mask": [[1, 1]] * 40,
    "labels": [0] * 40})


@pytest.mark.parametrize("kind, recall, mrr", [("right", 1.0, 1.0), ("constant", 0.0, 1 / 40), ("nan", 0.0, 1 / 40)])
def test_only_a_model_that_tells_passages_apart_scores(kind: str, recall: float, mrr: float) -> None:
    metrics = retrieval_metrics(Encoder(kind), PAIRS, Pad(), batch_size=8)
    assert metrics["recall_at_5"] == recall and metrics["mrr"] == pytest.approx(mrr)


def test_a_question_asked_with_several_passages_has_each_of_them_as_gold() -> None:
    # Prepare: rows 0 and 1 ask the same question (first token 0) with passages 100 and 101; the 'right' encoder puts
    # question 0 on passage 100 only, so row 1's own passage (101) ranks below it
    table = datasets.Dataset.from_dict({
        "input_ids": [[0, 7], [0, 7], [2, 7]], "attention_mask": [[1, 1]] * 3,
        "passage_input_ids": [[100, 8], [101, 8], [102, 8]], "passage_attention_mask": [[1, 1]] * 3,
        "labels": [0, 0, 0]})
    # Execute
    metrics = retrieval_metrics(Encoder("right"), table, Pad(), batch_size=8, k=1)
    # Assert: passage 100 answers row 1's question as well: every row finds a gold passage first
    assert metrics["recall_at_1"] == 1.0 and metrics["mrr"] == 1.0
