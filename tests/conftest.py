"""Shared fixtures: tiny random BERT and LLaMA backbones built from config, and a toy corpus.

Nothing here downloads: the models are random and saved to a temp folder, the tokenizer is a
WordPiece vocabulary written from the toy corpus' own words.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup would otherwise hang ~45 s before failing
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (make test) each worker, and every process it starts, gets one torch thread: two workers with
# two threads each on 2 cores thrash (a 41 s MiniLM test took 251 s), one thread each costs a CPU-bound test ~1.3x
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from fedcustom.config import build_config

if XDIST_WORKER:
    torch.set_num_threads(1)  # in case torch was imported before OMP_NUM_THREADS was set


POSITIVE = ["good", "great", "excellent", "happy", "wonderful", "superb", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "sad", "boring", "dull", "ugly"]
FILLER = ["the", "movie", "was", "a", "plot", "actors", "film", "story", "and", "it", "very", "quite"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """Sentences whose label is decided by which sentiment words they contain (easy to learn)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def _tokenizer(folder: Path) -> BertTokenizerFast:
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER) + "\n")
    return BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores vocab_file= (5 tokens, all [UNK])


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved 2-layer, hidden-16 random BERT with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved 2-layer, hidden-16 random LLaMA (decoder-only) with the same tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory: pytest.TempPathFactory) -> str:
    """240 labelled sentences as CSV (columns: sentence, label)."""
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    toy_rows(240).to_csv(path, index=False)
    return str(path)


# Learning rates that move a tiny random model in a couple of rounds (the methods' defaults
# are tuned for the pretrained MiniLM).
TINY_LR = {"full": 3e-3, "lora": 3e-3, "prompt": 1e-2, "prefix": 1e-2, "split": 3e-3, "distill": 3e-3, "head": 1e-2}


def config_with(values: dict, overrides: dict):
    """``values`` with ``section__key=value`` overrides applied, built into a RunConfig."""
    for key, value in overrides.items():
        section, name = key.split("__")
        values.setdefault(section, {})[name] = value
    return build_config(values)


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_bert: str, toy_csv: str):
    """Factory for a small, fast RunConfig; keyword overrides are ``section__key=value``."""

    def make(**overrides):
        values = {
            "model": {"name": tiny_bert, "max_length": 16},
            "data": {"dataset": toy_csv, "partition": "iid", "max_eval_examples": 60},
            "method": {"name": "prefix", "num_virtual_tokens": 4},
            "federation": {"clients": 2, "rounds": 2, "local_epochs": 4},
            "train": {"batch_size": 16, "seed": 0},
            "output": {"dir": str(tmp_path / "out"), "quiet": True, "report": False},
        }
        return config_with(values, overrides)

    return make


def converge_stage_cells(stage_name: str) -> list:
    """The cells a stage of the shipped converge sweep runs once the tune stage has picked SCAFFOLD for every method
    (its tune runs stood in for by their final accuracy)."""
    from fedcustom.bench.sweep import best_per_group, cells, load_sweep

    sweep = load_sweep("converge")
    stage = next(s for s in sweep.stages if s.name == stage_name)
    tune = next(s for s in sweep.stages if s.name == "tune")
    tuned = [{"labels": c.labels, "tags": c.tags, "summary": {"final_accuracy": 0.9 if c.labels["variant"] == "scaffold"
                                                               else 0.8}} for c in cells(sweep, tune)]
    return cells(sweep, stage, best_per_group(tuned, sweep, stage.pick))


def cut_off_in_round(monkeypatch: pytest.MonkeyPatch, rnd: int) -> None:
    """Make every run of this test end with KeyboardInterrupt as round ``rnd`` ends, before it is logged or
    checkpointed (an interrupted run: the checkpoint of round ``rnd - 1`` stays); ``monkeypatch.undo()`` ends it."""
    from fedcustom import runner

    evaluate_clients = runner.evaluate_clients

    def cut(job, result):  # type: ignore[no-untyped-def]
        if result.round == rnd:
            raise KeyboardInterrupt
        evaluate_clients(job, result)

    monkeypatch.setattr(runner, "evaluate_clients", cut)


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable mapping: a sentence with a sentiment word -> a fixed two-word answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"instruction": " ".join(words), "output": "good great" if positive else "bad awful",
                     "topic": "plot" if i % 3 else "actors"})
    return rows


@pytest.fixture(scope="session")
def toy_jsonl(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("instructions") / "toy.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in instruction_rows(160)))
    return str(path)


@pytest.fixture
def causal_config(tmp_path: Path, tiny_llama: str, toy_jsonl: str):
    """Factory for a small instruction-tuning RunConfig on tiny LLaMA; overrides as in ``tiny_config``."""

    def make(**overrides):
        values = {
            "model": {"name": tiny_llama, "task": "causal-lm", "max_length": 16},
            "data": {"dataset": toy_jsonl, "partition": "iid", "max_eval_examples": 16},
            "method": {"name": "lora", "num_virtual_tokens": 4},
            "federation": {"clients": 2, "rounds": 3, "local_epochs": 2},
            "generation": {"chat_template": False, "max_new_tokens": 3, "eval_generations": 4, "samples": 2},
            "train": {"batch_size": 16, "seed": 0},
            "output": {"dir": str(tmp_path / "out"), "quiet": True, "report": False},
        }
        return config_with(values, overrides)

    return make


def _saved_image_model(factory: pytest.TempPathFactory, name: str, build) -> str:
    """A random image classifier (seeded) saved with a 16 x 16 image processor."""
    from transformers import ViTImageProcessor

    folder = factory.mktemp(name)
    torch.manual_seed(0)
    build().save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved 2-layer, hidden-32 random ViT over 16 x 16 images (4 x 4 patches) with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=2)
    return _saved_image_model(tmp_path_factory, "tiny-vit", lambda: ViTForImageClassification(config))


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved two-stage random ResNet (convolutions, batch norm) with its image processor."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    return _saved_image_model(tmp_path_factory, "tiny-cnn", lambda: ResNetForImageClassification(config))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """160 noisy 16 x 16 grayscale PNGs in two class folders, dark and light (easy to learn)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, mean in (("dark", 70), ("light", 185)):
        (root / label).mkdir()
        for i in range(80):
            pixels = np.clip(rng.normal(mean, 40, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:03d}.png")
    return str(root)


@pytest.fixture
def image_config(tmp_path: Path, tiny_vit: str, image_folder: str):
    """Factory for a small image-classification RunConfig (tiny ViT, the dark/light folder)."""

    def make(**overrides):
        values = {
            "model": {"name": tiny_vit, "task": "image-classification"},
            "data": {"dataset": image_folder, "partition": "iid"},
            "method": {"name": "lora"},
            "federation": {"clients": 2, "rounds": 2, "local_epochs": 2},
            "train": {"batch_size": 16, "seed": 0, "lr": 3e-3},
            "output": {"dir": str(tmp_path / "out"), "quiet": True, "report": False},
        }
        return config_with(values, overrides)

    return make
