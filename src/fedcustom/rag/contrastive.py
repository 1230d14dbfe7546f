"""Customizing the retriever: an encoder trained on (question, passage) pairs with an in-batch-negatives
contrastive loss (InfoNCE; Karpukhin et al. 2020, DPR; Henderson et al. 2017), by any parameter-sharing method.

A batch holds B pairs interleaved as 2B rows (question 0, its passage, question 1, ...), so one ordinary forward
pass encodes both sides: PEFT's LoRA, prompt and prefix tuning then apply to questions and passages alike (a
prefix or soft prompt is added to every row of the batch), and nothing in the training loop changes. Each
question's own passage is its positive, the other B - 1 passages of the batch its negatives."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import datasets
import torch
from torch import nn

TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale 20 = 1 / 0.05
RECALL_K = 5


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, unit length. A prefix-tuned model's mask also covers the prefix positions, which
    the hidden states do not have: the mask's last ``hidden.shape[1]`` columns are the tokens'."""
    mask = attention_mask[:, -hidden.shape[1]:].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


class ContrastiveEncoder(nn.Module):
    """A Hugging Face encoder whose output is the unit mean-pooled embedding of each row; with ``labels`` (one per
    pair, the rows interleaved question/passage) it also returns the in-batch contrastive loss, in which a pair
    sharing the row's passage or question is not a negative."""

    def __init__(self, encoder: nn.Module, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.name_or_path = getattr(encoder, "name_or_path", "")  # PEFT records it as the adapter's base model
        self.temperature = temperature

    @property
    def device(self) -> torch.device:  # PEFT's prompt learning reads it from the base model
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> SimpleNamespace:
        passed = {k: v for k, v in kwargs.items() if k in ("past_key_values", "use_cache", "token_type_ids")}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              **passed).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.long)
        embeddings = mean_pool(hidden, attention_mask)
        loss = None
        if labels is not None:
            pairs = len(embeddings) // 2  # (an odd row, which has no passage, is left out)
            if pairs == 0:
                loss = embeddings.sum() * 0.0
            else:
                questions, passages = embeddings[0:2 * pairs:2], embeddings[1:2 * pairs:2]
                scores = questions @ passages.T / self.temperature
                scores = scores.masked_fill(_same_pair(labels[:pairs]), float("-inf"))
                loss = nn.functional.cross_entropy(scores, torch.arange(pairs, device=scores.device))
        return SimpleNamespace(loss=loss, embeddings=embeddings, last_hidden_state=hidden)

    def save_pretrained(self, folder: Any, **kwargs: Any) -> None:
        """Full fine-tuning saves the encoder itself (loadable with AutoModel, e.g. by `rag index --encoder`)."""
        self.encoder.save_pretrained(folder, **kwargs)


def _same_pair(labels: torch.Tensor) -> torch.Tensor:
    """Which off-diagonal (question, passage) scores of a batch are not negatives: the two pairs share a passage or
    a question (ChatterBot repeats both: about 28% of a topic client's batches of 8 held such a pair), so the other
    passage answers this question too. ``labels``: the collator's (passage group, question group) per pair; older
    one-column labels (a topic) mark nothing."""
    if labels.dim() != 2:
        return torch.zeros(len(labels), len(labels), dtype=torch.bool, device=labels.device)
    same = (labels[:, None, 0] == labels[None, :, 0]) | (labels[:, None, 1] == labels[None, :, 1])
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)


def pair_table(questions: list[str], passages: list[str], labels: list[int], tokenizer: Any,
               max_length: int) -> datasets.Dataset:
    """One row per pair: the question's and the passage's token ids and masks, and a label (the topic)."""
    q = tokenizer(questions, truncation=True, max_length=max_length)
    p = tokenizer(passages, truncation=True, max_length=max_length)
    return datasets.Dataset.from_dict({"input_ids": q["input_ids"], "attention_mask": q["attention_mask"],
                                       "passage_input_ids": p["input_ids"],
                                       "passage_attention_mask": p["attention_mask"], "labels": labels})


@dataclass
class PairCollator:
    """B pair rows -> 2B interleaved rows (question, passage, ...) padded together, and B labels, one per pair: the
    training loop counts examples (and cuts a batch to an example count) by its labels, and a pair is one example.
    A pair's label is (first pair of the batch with its passage, first pair with its question): two pairs that
    share a passage or a question are each other's positives, not negatives (:class:`ContrastiveEncoder`)."""

    tokenizer: Any

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        flat = []
        for row in rows:
            flat.append({"input_ids": row["input_ids"], "attention_mask": row["attention_mask"]})
            flat.append({"input_ids": row["passage_input_ids"], "attention_mask": row["passage_attention_mask"]})
        batch = dict(self.tokenizer.pad(flat, return_tensors="pt"))
        passages: dict[tuple[int, ...], int] = {}
        questions: dict[tuple[int, ...], int] = {}
        batch["labels"] = torch.tensor([[passages.setdefault(tuple(row["passage_input_ids"]), i),
                                         questions.setdefault(tuple(row["input_ids"]), i)] for i, row in enumerate(rows)])
        return batch


@torch.no_grad()
def embed(model: nn.Module, ids: list[list[int]], tokenizer: Any, batch_size: int) -> torch.Tensor:
    """Unit embeddings of token id lists through ``model`` (a ContrastiveEncoder, bare or PEFT-wrapped)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(ids), batch_size):
        batch = tokenizer.pad([{"input_ids": x} for x in ids[start:start + batch_size]], return_tensors="pt")
        out.append(model(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).embeddings.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def retrieval_metrics(model: nn.Module, table: datasets.Dataset, tokenizer: Any, batch_size: int,
                      k: int = RECALL_K) -> dict[str, float]:
    """recall@k, MRR and the contrastive loss of ``model`` on held-out pairs: every question against every distinct
    passage of the table (a passage shared by several questions is one candidate, a hit for each of them; a
    question asked in several rows with different passages has them all as gold: any of them answers it)."""
    was_training = model.training
    model.eval()
    passages: dict[tuple[int, ...], int] = {}
    gold = [passages.setdefault(tuple(p), len(passages)) for p in table["passage_input_ids"]]
    asked: dict[tuple[int, ...], set[int]] = {}
    for question, passage in zip(table["input_ids"], gold):
        asked.setdefault(tuple(question), set()).add(passage)
    golden = torch.zeros(len(gold), len(passages), dtype=torch.bool)
    for row, question in enumerate(table["input_ids"]):
        golden[row, list(asked[tuple(question)])] = True
    questions = embed(model, table["input_ids"], tokenizer, batch_size)
    candidates = embed(model, [list(p) for p in passages], tokenizer, batch_size)
    scores = questions @ candidates.T
    target = scores.masked_fill(~golden, float("-inf")).max(1).values  # the best-scoring gold passage
    # 1 = a gold passage scores highest; a tie with another passage counts against it (a collapsed encoder that
    # scores every passage alike ranks the gold last, not first), as does a non-finite score (a diverged model)
    rank = ((scores >= target[:, None]) & ~golden).sum(1) + 1
    rank[~torch.isfinite(scores).all(1)] = len(passages)
    losses = []
    collate, device = PairCollator(tokenizer), next(model.parameters()).device
    for start in range(0, len(table), batch_size):
        batch = collate([table[i] for i in range(start, min(start + batch_size, len(table)))])
        with torch.no_grad():
            losses.append(float(model(**{k2: v.to(device) for k2, v in batch.items()}).loss))
    model.train(was_training)
    return {f"recall_at_{k}": float((rank <= k).float().mean()), "mrr": float((1.0 / rank.float()).mean()),
            "loss": float(sum(losses) / max(len(losses), 1))}
