"""Customizing the retriever federatedly (issue 22): ``--task retrieval`` trains an encoder on (question, passage)
pairs with an in-batch contrastive loss by full fine-tuning, LoRA, prompt or prefix tuning; the trained model or
adapter is what ``fedcustom rag index --encoder`` takes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

pytest.importorskip("faiss", reason="retrieval needs faiss-cpu: pip install 'fedcustom[rag]'")

from conftest import FILLER, NEGATIVE, POSITIVE, _tokenizer  # noqa: E402
from fedcustom.cli import main  # noqa: E402
from fedcustom.rag.contrastive import ContrastiveEncoder, PairCollator, pair_table  # noqa: E402
from fedcustom.rag.encoder import Encoder  # noqa: E402
from fedcustom.training import LocalSchedule, local_batches, planned_steps, train_local  # noqa: E402

WORDS = POSITIVE + NEGATIVE + FILLER


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved random 2-layer BERT encoder (no head) with the toy tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Questions of three words whose passage repeats them among others: learnable, every passage distinct."""
    rng = random.Random(0)
    rows = []
    for i in range(120):
        words = rng.sample(WORDS, 3)
        rows.append({"instruction": " ".join(words), "output": " ".join(words + rng.sample(FILLER, 3)),
                     "topic": f"t{i % 3}"})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(out: Path, model: str, data: str, method: str, *extra: str) -> list[dict]:
    assert main(["run", "--task", "retrieval", "--model", model, "--dataset", data, "--method", method,
                 "--clients", "2", "--partition", "iid", "--max-length", "16", "--num-virtual-tokens", "4",
                 "--batch-size", "16", "--quiet", "--no-report", "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "round_log.jsonl").read_text().splitlines()]


def test_the_batch_interleaves_questions_and_passages_and_the_loss_rewards_matching_pairs(tiny_encoder: str) -> None:
    tokenizer = BertTokenizerFast.from_pretrained(tiny_encoder)
    texts = ["good film", "bad plot", "lovely story", "awful actors"]
    table = pair_table(texts, texts, [0, 1, 0, 1], tokenizer, 16)
    batch = PairCollator(tokenizer)([table[i] for i in range(4)])
    model = ContrastiveEncoder(BertModel.from_pretrained(tiny_encoder)).eval()
    # each question with its identical passage, then with the passages rotated by one
    matched = model(**batch).loss
    rotated = PairCollator(tokenizer)([{**table[i], "passage_input_ids": table[(i + 1) % 4]["passage_input_ids"],
                                        "passage_attention_mask": table[(i + 1) % 4]["passage_attention_mask"]}
                                       for i in range(4)])
    # one label per pair: (first pair with its passage, first pair with its question); all distinct here
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # question 0 and its (identical) passage
    assert matched < model(**rotated).loss


def test_a_pair_sharing_a_passage_or_question_is_not_a_negative(tiny_encoder: str) -> None:
    # Prepare: pairs 0 and 1 share their passage, pairs 2 and 3 their question (ChatterBot repeats both)
    tokenizer = BertTokenizerFast.from_pretrained(tiny_encoder)
    questions = ["good film", "lovely film", "bad plot", "bad plot"]
    passages = ["good lovely film", "good lovely film", "awful plot", "dull plot"]
    table = pair_table(questions, passages, [0, 0, 1, 1], tokenizer, 16)
    batch = PairCollator(tokenizer)([table[i] for i in range(4)])
    model = ContrastiveEncoder(BertModel.from_pretrained(tiny_encoder)).eval()
    # Execute
    with torch.no_grad():
        loss = model(**batch).loss
        embeddings = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).embeddings
    # Assert: the loss is InfoNCE with each row's other positive left out of its negatives
    assert batch["labels"].tolist() == [[0, 0], [0, 1], [2, 2], [3, 2]]
    scores = embeddings[0::2] @ embeddings[1::2].T / model.temperature
    kept = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(scores.masked_fill(~kept, float("-inf")), torch.arange(4))
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, torch.nn.functional.cross_entropy(scores, torch.arange(4)))


def test_a_pair_is_one_example_in_counts_and_in_a_batch_cut_to_an_example_count(tiny_encoder: str) -> None:
    # Prepare: 10 pairs, batches of 4 pairs; the same-passes baseline asks for exactly 6 example passes
    tokenizer = BertTokenizerFast.from_pretrained(tiny_encoder)
    texts = [f"{a} {b}" for a, b in zip(WORDS[:10], WORDS[10:20])]
    table = pair_table(texts, texts, [i % 2 for i in range(10)], tokenizer, 16)
    model = ContrastiveEncoder(BertModel.from_pretrained(tiny_encoder))
    # Execute
    by_epochs = train_local(model, table, tokenizer, LocalSchedule(lr=1e-3, batch_size=4, epochs=1,
                                                                   count_flops=False), seed=0)
    batches = list(local_batches(table, tokenizer, LocalSchedule(lr=1e-3, batch_size=4, examples=6), seed=0))
    by_examples = train_local(model, table, tokenizer, LocalSchedule(lr=1e-3, batch_size=4, examples=6,
                                                                     count_flops=False), seed=0)
    # Assert: an epoch is 10 examples in 3 steps; the cut batch keeps both rows of each of its 2 pairs
    assert (by_epochs.examples_seen, by_epochs.steps) == (10, 3)
    assert [len(b["labels"]) for b in batches] == [4, 2] and [len(b["input_ids"]) for b in batches] == [8, 4]
    assert (by_examples.examples_seen, by_examples.steps) == (6, 2)
    assert planned_steps(len(table), LocalSchedule(lr=1e-3, batch_size=4, examples=6)) == by_examples.steps


def test_federated_lora_retriever_tuning_lowers_the_contrastive_loss(tmp_path: Path, tiny_encoder: str,
                                                                     pairs_jsonl: str) -> None:
    log = _run(tmp_path / "out", tiny_encoder, pairs_jsonl, "lora", "--rounds", "3", "--lr", "0.01",
               "--local-epochs", "3")
    assert log[-1]["eval_loss"] < log[0]["eval_loss"] - 0.05
    assert log[-1]["eval_mrr"] >= log[0]["eval_mrr"]
    assert 0.0 <= log[-1]["eval_recall_at_5"] <= 1.0


@pytest.mark.parametrize("method, saved", [("full", "model"), ("lora", "adapter"), ("prompt", "adapter"),
                                           ("prefix", "adapter")])
def test_each_method_trains_a_retriever_that_rag_index_loads(tmp_path: Path, tiny_encoder: str, pairs_jsonl: str,
                                                             method: str, saved: str) -> None:
    # Execute: one round, then an index built with the customized encoder
    log = _run(tmp_path / "out", tiny_encoder, pairs_jsonl, method, "--rounds", "1", "--lr", "0.01")
    encoder = str(tmp_path / "out" / saved)
    assert main(["rag", "index", "--documents", pairs_jsonl, "--text-column", "output", "--encoder", encoder,
                 "--output", str(tmp_path / "index")]) == 0
    # Assert: the run measured the retriever; the customized encoder embeds differently from the base one
    assert {"eval_recall_at_5", "eval_mrr", "eval_loss"} <= set(log[1]) and np.isfinite(log[1]["train_loss"])
    assert json.loads((tmp_path / "index" / "client-0" / "index.json").read_text())["encoder"] == encoder
    texts = ["good film story", "bad plot"]
    customized, base = Encoder(encoder).encode(texts), Encoder(tiny_encoder).encode(texts)
    assert not np.allclose(customized, base, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(customized, axis=1), 1.0, atol=1e-5)


def test_dp_sgd_is_refused_for_in_batch_negatives(tmp_path: Path, tiny_encoder: str, pairs_jsonl: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--task", "retrieval", "--model", tiny_encoder, "--dataset", pairs_jsonl, "--method", "lora",
                 "--dp-sgd", "--output", str(tmp_path / "out")]) == 2
    assert "--dp-sgd with --task retrieval: in-batch negatives" in capsys.readouterr().err
