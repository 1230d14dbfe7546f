"""Greedy generation (bare and PEFT models), text metrics, and `fedcustom generate`."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, BertTokenizerFast, LlamaForCausalLM

from conftest import SPECIAL
from fedcustom.cli import main
from fedcustom.errors import FedCustomError
from fedcustom.generate_cli import load_for_generation
from fedcustom.generation import chat_prompt, generate
from fedcustom.text_metrics import exact_match, rouge_l

# Words only, so templated prompts stay inside the toy vocabulary.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}and{% endif %}")
PROMPTS = ["the movie was", "good", "a plot and the actors were very quite boring", "it film"]
NEW = 8
ADAPTERS = {
    "lora": lambda: LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
}


def chat_tokenizer(folder: str):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def templated(tokenizer, prompt: str) -> str:
    return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])


@pytest.fixture(scope="module")
def chatty_llama(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny LLaMA with a word-level vocabulary, its special-token logits pinned to 0 so greedy decoding
    emits words (a random model otherwise repeats [PAD]); saved with a chat template.

    Under transformers 5, ``BertTokenizerFast(vocab_file=...)`` (conftest) ignores the file and keeps only
    the 5 special tokens; ``vocab=`` loads the words, and the embeddings grow to match.
    """
    folder = tmp_path_factory.mktemp("chatty-llama")
    tokenizer = BertTokenizerFast(vocab=str(Path(tiny_llama) / "vocab.txt"))
    tokenizer.chat_template = CHAT_TEMPLATE
    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    with torch.no_grad():
        if model.config.vocab_size != len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
            model.model.embed_tokens.weight.normal_(0.0, 0.2)
            model.lm_head.weight.normal_(0.0, 0.2)
        model.lm_head.weight[: len(SPECIAL)] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(chatty_llama: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per PEFT method: its saved folder (with the chat tokenizer) and in-process answers, with and without it."""
    tokenizer = AutoTokenizer.from_pretrained(chatty_llama)
    prompts = [templated(tokenizer, p) for p in PROMPTS]
    out = {}
    for kind, make_config in ADAPTERS.items():
        backbone = LlamaForCausalLM.from_pretrained(chatty_llama)
        bare = generate(backbone, tokenizer, prompts, max_new_tokens=NEW)
        model = get_peft_model(backbone, make_config())
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0.0, 1.0)
        folder = tmp_path_factory.mktemp(f"adapter-{kind}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[kind] = {"dir": str(folder), "model": model, "bare": bare,
                     "adapted": generate(model, tokenizer, prompts, max_new_tokens=NEW, batch_size=3)}
    return out


# --- generation -------------------------------------------------------------------------------------


def test_batched_generation_equals_one_by_one(chatty_llama: str) -> None:
    # Prepare
    model = LlamaForCausalLM.from_pretrained(chatty_llama).train()
    tokenizer = AutoTokenizer.from_pretrained(chatty_llama)
    assert tokenizer.padding_side == "right"
    # Execute
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
    # Assert
    assert batched == single
    assert all(len(text.split()) == NEW for text in batched)  # only new words, no specials, no prompt
    assert tokenizer.padding_side == "right" and model.training


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_changes_generation_and_batches_like_single(adapters: dict, chatty_llama: str, kind: str) -> None:
    entry = adapters[kind]
    tokenizer = AutoTokenizer.from_pretrained(chatty_llama)
    single = [generate(entry["model"], tokenizer, [templated(tokenizer, p)], max_new_tokens=NEW)[0]
              for p in PROMPTS]
    assert entry["adapted"] != entry["bare"] and all(entry["adapted"])
    assert entry["adapted"] == single


@pytest.mark.parametrize("kind", ADAPTERS)
def test_single_prompt_matches_peft_own_generate(adapters: dict, chatty_llama: str, kind: str) -> None:
    """Unpadded, our path (own soft-prompt injection for prompt tuning) agrees with PEFT's generate."""
    model, tokenizer = adapters[kind]["model"], AutoTokenizer.from_pretrained(chatty_llama)
    for prompt in PROMPTS:
        enc = tokenizer(templated(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=NEW, do_sample=False)
        native = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert generate(model, tokenizer, [templated(tokenizer, prompt)], max_new_tokens=NEW) == [native]


def test_too_long_prompt_names_index_count_and_limit(chatty_llama: str, adapters: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chatty_llama)
    model = LlamaForCausalLM.from_pretrained(chatty_llama)
    long_prompt = " ".join(["movie"] * 60)  # 60 tokens (no special tokens added)
    with pytest.raises(FedCustomError, match=r"prompt 1: 60 tokens, but at most 56 fit"):
        generate(model, tokenizer, ["good", long_prompt], max_new_tokens=NEW)
    with pytest.raises(FedCustomError, match=r"prompt 0: 60 tokens, but at most 52 fit .*4 virtual tokens"):
        generate(adapters["prompt"]["model"], tokenizer, [long_prompt], max_new_tokens=NEW)
    with pytest.raises(FedCustomError, match=r"prompt 0: empty"):
        generate(model, tokenizer, [" "], max_new_tokens=NEW)


def test_chat_prompt_template_raw_and_missing_template(tiny_llama: str) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "the"}, {"role": "user", "content": "movie"},
                {"role": "user", "content": "plot"}]
    assert chat_prompt(chat_tokenizer(tiny_llama), messages) == "the movie plot and"
    assert chat_prompt(plain, messages, raw=True) == "movie\n\nplot"
    with pytest.raises(FedCustomError, match=r"tiny-llama.*no chat template.*--no-chat-template"):
        chat_prompt(plain, messages)
    with pytest.raises(FedCustomError, match="message 0"):
        chat_prompt(plain, [{"text": "x"}])


# --- text metrics -----------------------------------------------------------------------------------


def test_exact_match_normalises_case_and_whitespace_only() -> None:
    assert exact_match([" The  Cat\n", "cat.", "dog"], ["the cat", "cat", "dog"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_rouge_l_known_values() -> None:
    assert rouge_l(["The cat sat."], ["the cat sat"]) == 1.0
    assert rouge_l(["red green"], ["blue yellow"]) == 0.0
    # LCS(a b c, a x b y) = "a b": precision 2/3, recall 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l(["a b c"], ["a x b y"]) == pytest.approx(4 / 7)
    # mean over pairs: LCS "the cat on mat" = 4 of 6 both ways -> 2/3; and 1.0
    assert rouge_l(["the cat sat on the mat", "x"], ["the cat lay on a mat", "x"]) == pytest.approx((2 / 3 + 1) / 2)


# --- fedcustom generate -----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("kind", ADAPTERS)
def test_cli_prints_what_generate_gives_in_process(adapters: dict, capsys: pytest.CaptureFixture, kind: str) -> None:
    entry = adapters[kind]
    code, out, _ = run_cli(capsys, "--adapter", entry["dir"], "--max-new-tokens", str(NEW), PROMPTS[0])
    assert code == 0
    assert out == entry["adapted"][0] + "\n"


def test_cli_interactive_answers_each_line_until_empty(adapters: dict, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    entry = adapters["lora"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n{PROMPTS[1]}\n\n{PROMPTS[2]}\n"))
    code, out, _ = run_cli(capsys, "--adapter", entry["dir"], "--max-new-tokens", str(NEW), "--interactive")
    assert code == 0
    assert out.splitlines() == entry["adapted"][:2]


def test_cli_whole_model_folder_system_and_backbone_override(chatty_llama: str, adapters: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    model, tokenizer = load_for_generation(chatty_llama)
    expected = generate(model, tokenizer, [chat_prompt(tokenizer, [{"role": "system", "content": "the"},
                                                                   {"role": "user", "content": "good"}])], NEW)
    code, out, _ = run_cli(capsys, "--adapter", chatty_llama, "--system", "the", "--max-new-tokens", str(NEW), "good")
    assert (code, out) == (0, expected[0] + "\n")

    # --model stands in for a backbone the adapter names but this machine lacks
    moved = tmp_path / "moved"
    shutil.copytree(adapters["lora"]["dir"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/llama"}))
    code, out, _ = run_cli(capsys, "--adapter", str(moved), "--model", chatty_llama, "--max-new-tokens", str(NEW),
                           PROMPTS[0])
    assert (code, out) == (0, adapters["lora"]["adapted"][0] + "\n")
    code, _, err = run_cli(capsys, "--adapter", str(moved), PROMPTS[0])
    assert code == 2 and "base model '/gone/llama': cannot be loaded" in err and "--model" in err


def test_an_adapter_naming_a_packaged_models_hub_id_loads_on_the_packaged_copy(
        adapters: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # Prepare: an adapter as a run on the packaged SmolLM2 saves it (its base named by the Hub id); which backbone
    # generate then loads is recorded instead of loading the 135M model
    import fedcustom.generate_cli as generate_cli

    moved = tmp_path / "moved"
    shutil.copytree(adapters["lora"]["dir"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": hub_id}))
    loaded: list[str] = []

    def stand_in(name: str, what: str, hint: str = "") -> None:
        loaded.append(name)
        raise FedCustomError("stop here")

    monkeypatch.setattr(generate_cli, "_load_causal_lm", stand_in)
    # Execute
    code, _, _ = run_cli(capsys, "--adapter", str(moved), PROMPTS[0])
    # Assert: the packaged alias (the weights it was trained on), not a Hub download
    assert code == 2 and loaded == ["smollm2"]


def test_cli_no_chat_template(tiny_llama: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "--adapter", tiny_llama, "good")
    assert code == 2 and "no chat template" in err and "--no-chat-template" in err
    code, out, _ = run_cli(capsys, "--adapter", tiny_llama, "--no-chat-template", "--max-new-tokens", "3", "good")
    assert code == 0 and out.endswith("\n")


def _adapter_config(folder: Path, **values: object) -> str:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **values}))
    return str(folder)


def test_cli_errors(tmp_path: Path, tiny_bert: str, capsys: pytest.CaptureFixture) -> None:
    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(tmp_path): "neither a PEFT adapter folder",
        _adapter_config(tmp_path / "cls", task_type="SEQ_CLS", base_model_name_or_path=tiny_bert):
            "generate needs a causal-LM adapter",
        _adapter_config(tmp_path / "nobase", task_type="CAUSAL_LM"): "names no base model",
        _adapter_config(tmp_path / "gone", task_type="CAUSAL_LM", base_model_name_or_path="no-such/model-xyz"):
            "base model 'no-such/model-xyz': cannot be loaded",
        tiny_bert: "generate needs a causal-LM model",
    }
    for folder, message in cases.items():
        code, out, err = run_cli(capsys, "--adapter", folder, "good")
        assert (code, out) == (2, ""), folder
        assert message in err and err.startswith("fedcustom: error:") and err.count("\n") == 1, err


def test_cli_points_at_the_run_folders_adapter_and_refuses_a_backbone_for_a_whole_model(
        tmp_path: Path, tiny_llama: str, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    code, _, err = run_cli(capsys, "--adapter", str(run), "good")
    assert code == 2 and f"a run folder holds it in {run / 'adapter'}" in err
    code, _, err = run_cli(capsys, "--adapter", tiny_llama, "--model", "smollm2", "good")
    assert code == 2 and "is a whole model" in err and "drop --model" in err
