"""Inputs that a library would reject mid-run (sklearn, torch, PEFT, pyarrow), or that would let a run finish having
learned nothing, are refused up front with one line naming the input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcustom.config import build_config, read_toml
from fedcustom.errors import FedCustomError


def _one_line(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message.strip()


@pytest.mark.parametrize("values, named", [
    ({"train": {"seed": -1}}, "train.seed (--seed)"),
    ({"train": {"seed": 2**32}}, "train.seed (--seed)"),
    ({"data": {"split_seed": -5}}, "data.split_seed (--split-seed)"),
    ({"train": {"weight_decay": -1.0}}, "train.weight_decay (--weight-decay)"),
    ({"federation": {"clients": 2, "min_available": 3}}, "federation.min_available (--min-available)"),
    ({"federation": {"clients": 10, "fraction": 0.5, "min_available": 6}}, "6 exceeds the 5 clients sampled"),
    ({"method": {"lora_dropout": 1.5}}, "method.lora_dropout"),
    ({"method": {"lora_alpha": 0}}, "method.lora_alpha (--lora-alpha)"),
    ({"method": {"projection_hidden": 0}}, "method.projection_hidden"),
    ({"federation": {"target_accuracy": 85.0}}, "for 85% write 0.85"),
    ({"data": {"partition": "shards:inf"}}, "K must be a whole number"),
    ({"data": {"partition": "shards:nan"}}, "K must be a whole number"),
    ({"codec": {"up": ""}}, "codec.up (--codec) '': an empty stage"),  # once quietly raw
    ({"codec": {"up": "delta,,zstd"}}, "an empty stage"),
    ({"output": {"dir": " "}}, "output.dir (--output): expected a folder path"),  # once the working directory
    ({"privacy": {"dp_sgd": True}, "method": {"name": "lora"}, "train": {"precision": "fp16"}},
     "--dp-sgd with --precision fp16"),  # loss scaling made Opacus clip every example to C / 65,536
    ({"method": {"name": "split"}, "train": {"precision": "bf16"}}, "--method split with --precision bf16"),
    ({"adversary": {"attack": "sign-flip", "fraction": 0.05}, "federation": {"clients": 10}},
     "is no attacker at all"),  # round(0.5) = 0: a run reported as attacked that was clean
    ({"adversary": {"attack": "label-flip", "fraction": 0.5}, "model": {"task": "causal-lm", "name": "smollm2"}},
     "--attack label-flip with --task causal-lm"),  # crashed after loading (token-id labels)
    ({"method": {"name": "split", "split_client": "prefix"}, "model": {"task": "causal-lm", "name": "smollm2"}},
     "--split-client prefix: the prefix client half is built for classification"),  # crashed at the first eval
])
def test_values_a_library_would_reject_mid_run_are_config_errors(values: dict, named: str) -> None:
    with pytest.raises(FedCustomError) as caught:
        build_config(values)
    assert named in str(caught.value) and _one_line(str(caught.value)), str(caught.value)


@pytest.mark.parametrize("values", [{"train": {"seed": 0, "weight_decay": 0.0}}, {"federation": {"min_available": 10}},
                                    {"federation": {"target_accuracy": 0.0}}, {"method": {"lora_dropout": 0.0}}])
def test_the_edges_of_those_ranges_are_accepted(values: dict) -> None:
    build_config(values)


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "utf16.toml").write_bytes("[federation]\nrounds = 2\n".encode("utf-16"))
    with pytest.raises(FedCustomError, match=r"utf16.toml: not UTF-8 text"):
        read_toml(tmp_path / "utf16.toml")
    with pytest.raises(FedCustomError, match="not a file"):
        read_toml(tmp_path)


@pytest.mark.parametrize("name, content, expected", [
    ("nulltext.jsonl", b'{"text": "fine", "label": "a"}\n{"text": null, "label": "b"}\n', "1 rows have no text (e.g. row 1"),
    ("listlabel.jsonl", b'{"text": "x", "label": ["a"]}\n{"text": "y", "label": ["b"]}\n', "holds lists or objects"),
    ("blanklabel.csv", b"text,label\ngood,pos\nbad,\nmeh,neg\n", "1 rows have no label (e.g. row 1"),
    ("oneclass.csv", b"text,label\ngood,pos\nfine,pos\nok,pos\n", "every row has the label 'pos'"),
])
def test_data_that_cannot_train_a_classifier_is_a_one_line_error(tmp_path: Path, name: str, content: bytes,
                                                                  expected: str) -> None:
    from fedcustom.data import load_splits

    (tmp_path / name).write_bytes(content)
    cfg = build_config({"data": {"dataset": str(tmp_path / name)}})
    with pytest.raises(FedCustomError) as caught:
        load_splits(cfg.data, seed=0)
    assert expected in str(caught.value) and name in str(caught.value) and _one_line(str(caught.value))


def test_lora_targets_that_match_no_module_name_the_models_linear_layers(tiny_config) -> None:
    from fedcustom.assemble import build_model
    from fedcustom.methods import get_method
    from fedcustom.models import load_tokenizer

    cfg = tiny_config(method__name="lora", method__lora_targets=["nonexistent_module"])
    with pytest.raises(FedCustomError) as caught:
        build_model(cfg, get_method("lora"), cfg.model.name, ["neg", "pos"], load_tokenizer(cfg.model.name))
    message = str(caught.value)
    assert "--lora-targets" in message and "nonexistent_module" in message and "query" in message, message


@pytest.mark.parametrize("method, max_length, expected", [
    ("lora", 65, "--max-length 64 or less"), ("prompt", 62, "plus the 4 virtual tokens"),
    ("lora", 64, None), ("prefix", 64, None),  # prefix tuning's tokens are keys and values, not input positions
])
def test_max_length_beyond_the_models_position_table_is_refused(tiny_config, method: str, max_length: int,
                                                                 expected: str | None) -> None:
    from fedcustom.assemble import build_model
    from fedcustom.methods import get_method
    from fedcustom.models import load_tokenizer

    cfg = tiny_config(method__name=method, model__max_length=max_length)  # tiny BERT: 64 positions, 4 virtual tokens
    build = lambda: build_model(cfg, get_method(method), cfg.model.name, ["neg", "pos"],  # noqa: E731
                                load_tokenizer(cfg.model.name))
    if expected is None:
        build()
        return
    with pytest.raises(FedCustomError) as caught:
        build()
    assert expected in str(caught.value) and "model.max_length (--max-length)" in str(caught.value)


@pytest.mark.parametrize("data, expected", [
    ({"eval_split": "test"}, "--eval-split test: dataset"),
    ({"train_split": "validation"}, "--train-split validation: dataset"),
])
def test_split_flags_on_a_source_without_splits_are_refused_not_ignored(tmp_path: Path, data: dict,
                                                                         expected: str) -> None:
    # ignored, --eval-split on a local file scored the model on the very rows it trained on
    from fedcustom.data import load_splits
    from fedcustom.data.causal import load_instruction_splits

    (tmp_path / "rows.csv").write_bytes(b"text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    for load, dataset in [(load_splits, str(tmp_path / "rows.csv")), (load_splits, "rotten_tomatoes"),
                          (load_instruction_splits, "chatterbot")]:
        cfg = build_config({"data": {"dataset": dataset, **data}})
        with pytest.raises(FedCustomError) as caught:
            load(cfg.data, 0)
        assert expected in str(caught.value) and _one_line(str(caught.value))
    # with its own eval file the split flag is no harm; a Hub name keeps both flags (checked, not loaded here)
    cfg = build_config({"data": {"dataset": str(tmp_path / "rows.csv"), "eval_dataset": str(tmp_path / "rows.csv"),
                                 "eval_split": "test"}})
    assert len(load_splits(cfg.data, 0)[1]) == 4
    from fedcustom.data.sources import check_split_flags

    check_split_flags(build_config({"data": {"dataset": "glue", **data}}).data, has_splits=True)
