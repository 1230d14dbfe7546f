"""Knowledge as soft labels on the public set: encode, decode, validate, aggregate, distill.

Pure tensor functions shared by the KD-FedLLM client and server. A client uploads either its raw
logits on the public set, ``{"logits": (rows, labels)}``, or only its top-k soft labels,
``{"topk_probs": (rows, k), "topk_indices": (rows, k) int16}``; the server turns either into a
probability distribution per row (the mass outside the top k is spread evenly over the other
labels) and averages the clients' distributions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.device import model_device, to_device
from fedcustom.errors import UpdateRejected
from fedcustom.training import counted

Knowledge = dict[str, torch.Tensor]


def public_batches(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, batch_size: int,
                   seed: int | None = None) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(row indices, tokenized batch) over the public texts, shuffled when ``seed`` is given."""
    order = torch.arange(len(texts)) if seed is None else torch.randperm(
        len(texts), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[int(i)] for i in rows], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        yield rows, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def public_logits(model: nn.Module, texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                  batch_size: int) -> torch.Tensor:
    """The model's logits on every public row, in row order: (rows, labels), fp32, dropout off."""
    return counted_public_logits(model, texts, tokenizer, max_length, batch_size, count_flops=False)[0]


def encode_knowledge(logits: torch.Tensor, topk: int | None, temperature: float) -> Knowledge:
    """What a client uploads: all logits, or the top-k soft labels (probabilities at ``temperature``)."""
    if topk is None or topk >= logits.shape[1]:
        return {"logits": logits.contiguous()}
    probs, indices = torch.softmax(logits / temperature, dim=-1).topk(topk, dim=-1)  # (rows, k) each
    index_type = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32  # a vocabulary
    return {"topk_probs": probs.contiguous(), "topk_indices": indices.to(index_type).contiguous()}


def decode_knowledge(sent: Knowledge, rows: int, labels: int, temperature: float,
                     renormalize: bool = False) -> torch.Tensor:
    """A client's upload as soft labels, (rows, labels) summing to 1 per row; UpdateRejected if malformed.

    Top-k soft labels spread the mass outside the top k evenly over the other labels, or with ``renormalize``
    put all of it on the top k (over a vocabulary the even spread would smooth every row toward uniform)."""
    if sent.keys() == {"logits"}:
        logits = sent["logits"]
        _check_shape("logits", logits, (rows, labels), labels)
        _check_finite("logits", logits)
        return torch.softmax(logits.float() / temperature, dim=-1)
    if sent.keys() != {"topk_probs", "topk_indices"}:
        raise UpdateRejected(f"knowledge tensors {sorted(sent)}: expected ['logits'] or ['topk_indices', 'topk_probs']")
    probs, indices = sent["topk_probs"].float(), sent["topk_indices"].long()
    k = probs.shape[-1] if probs.dim() == 2 else -1
    _check_shape("topk_probs", probs, (rows, k), labels)
    _check_shape("topk_indices", indices, (rows, k), labels)
    _check_finite("topk_probs", probs)
    if not 1 <= k < labels or (probs < 0).any() or (probs.sum(-1) > 1 + 1e-4).any():
        raise UpdateRejected(f"topk_probs: expected 1 <= k < {labels} probabilities per row summing to at most 1")
    if (indices < 0).any() or (indices >= labels).any() or (indices.sort(-1).values.diff(dim=-1) == 0).any():
        raise UpdateRejected(f"topk_indices: expected distinct label ids in [0, {labels}) per row")
    if renormalize:
        return torch.zeros(rows, labels).scatter_(1, indices, probs / probs.sum(-1, keepdim=True).clamp_min(1e-12))
    rest = (1 - probs.sum(-1, keepdim=True)).clamp_min(0) / (labels - k)  # (rows, 1)
    dense = rest.expand(rows, labels).clone()
    return dense.scatter_(1, indices, probs)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, int], labels: int) -> None:
    if tuple(tensor.shape) != expected:
        hint = ""
        if tensor.dim() == 2 and tensor.shape[0] == expected[0] and name == "logits":
            hint = f" (the client's label space has {tensor.shape[1]} labels, the server's {labels})"
        raise UpdateRejected(f"{name}: shape {tuple(tensor.shape)}, expected {expected}{hint}")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise UpdateRejected(f"{name}: contains NaN or Inf")


def aggregate_soft_labels(soft: list[torch.Tensor], num_examples: list[int], weighting: str) -> torch.Tensor:
    """Average of the clients' (rows, labels) soft labels: uniform, by data size, or per row by confidence."""
    if weighting not in ("uniform", "examples", "confidence"):
        raise ValueError(f"kd weighting {weighting!r}: expected uniform, examples or confidence")
    # A running sum, not a stack: over a vocabulary (causal LM) each client's soft labels are large.
    total, weight_sum = torch.zeros_like(soft[0]), torch.zeros(soft[0].shape[0], 1)
    for probs, examples in zip(soft, num_examples):
        if weighting == "confidence":
            weight = probs.max(dim=-1, keepdim=True).values  # (rows, 1): the client's top probability
        else:
            weight = torch.full((probs.shape[0], 1), float(examples if weighting == "examples" else 1))
        total += weight * probs
        weight_sum += weight
    return total / weight_sum


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(targets || softmax(student / T)) * T^2 (Hinton et al., 2015), mean over rows."""
    log_probs = torch.log_softmax(student_logits / temperature, dim=-1)
    return nn.functional.kl_div(log_probs, targets, reduction="batchmean") * temperature**2


def distill_batches(model: nn.Module, batches: Iterable[tuple[dict, torch.Tensor]],
                    student: Callable[[dict], torch.Tensor], lr: float, temperature: float, seed: int,
                    count_flops: bool, kind: str) -> tuple[float, int]:
    """AdamW on the model's trainable tensors, one step per (batch, wanted soft labels) pair, pulling
    ``student(batch)`` (rows, classes) toward the wanted rows. Returns the mean distillation loss and the FLOPs
    counted per ``kind`` and batch shape (0 when ``count_flops`` is off)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    torch.manual_seed(seed)
    model.train()
    losses, flops, device = [], 0, model_device(model)
    for batch, wanted in batches:
        batch, wanted = to_device(batch, device), wanted.to(device)

        def step(batch: dict = batch, wanted: torch.Tensor = wanted) -> float:
            loss = distillation_loss(student(batch), wanted, temperature)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        if count_flops:
            loss, step_flops = counted(model, (kind, *batch["input_ids"].shape), step)
            flops += step_flops
        else:
            loss = step()
        losses.append(loss)
    return (sum(losses) / len(losses) if losses else float("nan")), int(flops)


def logits_over(model: nn.Module, batches: Iterable[dict], forward: Callable[[dict], torch.Tensor],
                count_flops: bool, kind: str) -> tuple[torch.Tensor, int]:
    """``forward(batch)`` for every batch with dropout off and no gradients, concatenated; and the FLOPs counted
    per ``kind`` and batch shape (0 when ``count_flops`` is off)."""
    model.eval()
    parts, flops, device = [], 0, model_device(model)
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            if count_flops:
                logits, batch_flops = counted(model, (kind, *batch["input_ids"].shape), lambda b=batch: forward(b))
            else:
                logits, batch_flops = forward(batch), 0
            parts.append(logits.cpu())  # knowledge is encoded and aggregated on the CPU
            flops += batch_flops
    return torch.cat(parts), flops


def distill_into(model: nn.Module, texts: list[str], targets: torch.Tensor, tokenizer: PreTrainedTokenizerBase,
                 max_length: int, lr: float, batch_size: int, epochs: int, temperature: float, seed: int,
                 count_flops: bool) -> tuple[float, int]:
    """Train the model's trainable tensors toward ``targets`` (rows, labels) on the public texts.

    Returns the mean distillation loss and the FLOPs counted (0 when ``count_flops`` is off).
    """
    batches = ((batch, targets[rows]) for epoch in range(epochs)
               for rows, batch in public_batches(texts, tokenizer, max_length, batch_size, seed=seed + epoch))
    return distill_batches(model, batches, lambda batch: model(**batch).logits, lr, temperature, seed, count_flops,
                           "distill")


def counted_public_logits(model: nn.Module, texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                          batch_size: int, count_flops: bool) -> tuple[torch.Tensor, int]:
    """:func:`public_logits` and the FLOPs of computing them (0 when ``count_flops`` is off)."""
    batches = (batch for _, batch in public_batches(texts, tokenizer, max_length, batch_size))
    return logits_over(model, batches, lambda batch: model(**batch).logits.float(), count_flops, "infer")
