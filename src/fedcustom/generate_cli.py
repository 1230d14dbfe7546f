"""`fedcustom generate`: load a trained causal-LM adapter (or whole model) and answer prompts.

The folder is what a generative run saves: a PEFT adapter (``adapter_config.json``, backbone named
inside it or given with ``--model``) or a whole fine-tuned model (``config.json``), with the
tokenizer beside it. Output is plain text, one answer per prompt, so it pipes well.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from torch import nn
from transformers import PreTrainedTokenizerBase

from fedcustom.device import resolve_device
from fedcustom.errors import FedCustomError
from fedcustom.personalize import PERSONAL_ADAPTER, load_personal

CAUSAL_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class GenerateOptions:
    """What `fedcustom generate` was asked to do (plain arguments, parsed by cli.py)."""

    adapter: str
    model: str | None = None
    max_new_tokens: int = 64
    system: str | None = None
    raw: bool = False  # --no-chat-template
    prompt: str | None = None
    interactive: bool = False
    device: str = "auto"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedCustomError(f"{path}: not readable JSON ({exc})") from None


def _load_tokenizer(folder: str, fallback: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the weights, else the backbone's; pad falls back to EOS."""
    from transformers import AutoTokenizer

    from fedcustom.models import load_tokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return load_tokenizer(fallback)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise FedCustomError(f"--adapter {folder}: its tokenizer files could not be loaded ({exc})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_causal_lm(name: str, what: str, hint: str = "") -> nn.Module:
    from transformers import AutoModelForCausalLM

    from fedcustom.models import quiet_transformers, resolve_model

    quiet_transformers()
    path = resolve_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedCustomError(f"{what} {name!r}: cannot be loaded as a causal LM ({first_line}){hint}") from None


def _load_adapter(folder: Path, model: str | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    config = _read_json(folder / "adapter_config.json")
    task_type = config.get("task_type")
    if task_type != "CAUSAL_LM":
        raise FedCustomError(f"--adapter {folder}: a {task_type or 'untyped'} adapter; generate needs a causal-LM "
                             f"adapter (task_type CAUSAL_LM), e.g. from a generative run")
    from fedcustom.models import packaged_alias

    base = model or config.get("base_model_name_or_path")
    base = (packaged_alias(base) or base) if base and not model else base  # the packaged copy it was trained on
    if not base:
        raise FedCustomError(f"--adapter {folder}: adapter_config.json names no base model; "
                             f"pass --model NAME_OR_PATH with the backbone it was trained on")
    backbone = _load_causal_lm(base, f"--adapter {folder}: base model",
                               "" if model else "; pass --model NAME_OR_PATH with the backbone it was trained on")
    tokenizer = _load_tokenizer(str(folder), base)
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(backbone, str(folder))
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FedCustomError(f"--adapter {folder}: does not fit the backbone {base!r} ({first_line})") from None
    if (folder / PERSONAL_ADAPTER).is_dir():  # a dual-lora client's own model: its personal adapter on too
        peft_model = load_personal(peft_model, folder)
    return peft_model, tokenizer


def _load_whole_model(folder: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    architectures = _read_json(folder / "config.json").get("architectures") or []
    if architectures and not any(a.endswith(CAUSAL_ARCHITECTURES) for a in architectures):
        raise FedCustomError(f"--adapter {folder}: a {', '.join(architectures)} model; generate needs a causal-LM "
                             f"model (e.g. ...ForCausalLM) from a generative run")
    return _load_causal_lm(str(folder), "--adapter"), _load_tokenizer(str(folder), str(folder))


def load_for_generation(adapter: str, model: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Model and tokenizer from an adapter folder (backbone: ``model`` or the adapter's own) or a model folder."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise FedCustomError(f"--adapter {adapter}: no such folder")
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, model)
    if (folder / "config.json").is_file():
        if model is not None:
            raise FedCustomError(f"--adapter {adapter} is a whole model (config.json, no adapter_config.json): it is "
                                 f"its own backbone, so --model {model} would be ignored; drop --model")
        return _load_whole_model(folder)
    inside = [name for name in ("adapter", "model") if (folder / name).is_dir()]
    hint = f"; a run folder holds it in {folder / inside[0]}" if inside else ""
    raise FedCustomError(f"--adapter {adapter}: neither a PEFT adapter folder (adapter_config.json) "
                         f"nor a model folder (config.json){hint}")


def _messages(system: str | None, prompt: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}]


def prompt_lines(stdin: TextIO) -> Iterator[str]:
    """Lines from stdin up to EOF or the first empty line, read lazily (one answer per line)."""
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line.strip():
            return
        yield line.rstrip("\n")


def run_generate(options: GenerateOptions) -> int:
    """Load once, answer the prompt (or each stdin line with ``interactive``), print the answers."""
    from fedcustom.generation import chat_prompt, generate

    if options.system and options.raw:
        raise FedCustomError("--system needs the chat template; drop --system or --no-chat-template")
    if options.max_new_tokens < 1:
        raise FedCustomError(f"--max-new-tokens {options.max_new_tokens}: expected a positive number")
    device = resolve_device(options.device, "--device")  # before loading: a missing GPU is a one-line error
    model, tokenizer = load_for_generation(options.adapter, options.model)
    model.to(device)

    def answer(prompt: str) -> None:
        text = chat_prompt(tokenizer, _messages(options.system, prompt), raw=options.raw)
        print(generate(model, tokenizer, [text], max_new_tokens=options.max_new_tokens)[0], flush=True)

    if not options.interactive:
        if not (options.prompt or "").strip():
            raise FedCustomError("the prompt is empty: give one, or --interactive to read prompts from stdin")
        answer(options.prompt)
        return 0
    for line in prompt_lines(sys.stdin):
        try:
            answer(line)
        except FedCustomError as exc:  # one bad line (e.g. too long) should not end the session
            print(f"fedcustom: error: {exc}", file=sys.stderr, flush=True)
    return 0
