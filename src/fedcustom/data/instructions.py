"""Instruction data for generative customization: any source becomes (messages, response, topic) rows.

Instruction tuning (Wei et al. 2022, "Finetuned Language Models Are Zero-Shot Learners"; the
Alpaca instruction/input/output format, Taori et al. 2023) trains a causal LM to produce
``response`` after a chat-templated ``messages`` prefix. Sources: the packaged ChatterBot corpus
(offline), local JSONL/JSON/CSV/Parquet files and Hugging Face datasets. Recognised schemas:

- a chat column ``messages`` or ``conversations`` (``role``/``content`` or ShareGPT ``from``/``value``
  turns): the last assistant turn is the response, the turns before it the messages;
- a prompt column (``instruction``, ``prompt`` or ``question``) with a response column (``output``,
  ``response``, ``answer`` or ``completion``); a non-empty ``input``/``context`` is joined into the user
  message (Alpaca, Dolly) and a ``system`` column becomes a system message.

``topic`` comes from a ``topic``/``category``/``subject`` column ("" when there is none); the
source's other scalar columns are kept as strings so a run can split clients by any of them
(:func:`fedcustom.data.by_column.partition_by_column`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import yaml

from fedcustom.data.sources import FILE_SUFFIXES, FileLayout, read_file
from fedcustom.errors import FedCustomError

CHAT_COLUMNS = ("messages", "conversations")
PROMPT_COLUMNS = ("instruction", "prompt", "question")
RESPONSE_COLUMNS = ("output", "response", "answer", "completion")
INPUT_COLUMNS = ("input", "context")
TOPIC_COLUMNS = ("topic", "category", "subject")
SYSTEM_COLUMN = "system"
SCHEMAS = (
    "a messages/conversations column of chat turns; instruction/input/output (Alpaca); "
    "prompt/response; question/answer; or name them with --text-column PROMPT --label-column RESPONSE"
)
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}
CANONICAL = ("messages", "response", "topic")
FEATURES = {
    "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "response": datasets.Value("string"),
    "topic": datasets.Value("string"),
}
Row = tuple[list[dict[str, str]], str]  # (messages, response)
CHATTERBOT_CONTEXT = 5  # most lines of context per ChatterBot row (odd: it starts on a user turn)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster


def _chatterbot_pairs(lines: list[str]) -> list[Row]:
    """One row per consecutive (question, answer) pair; up to CHATTERBOT_CONTEXT earlier lines are context.

    Each line answers the one before it (ChatterBot's own reading), so a conversation of n lines gives
    n - 1 rows. Roles alternate counting back from the response, and the context always starts on a
    user turn (odd length), so every row is a user/assistant/.../user conversation any chat template
    accepts; the cap keeps the few very long conversations (up to 88 lines) from giving prompts that a
    short max_length would cut into.
    """
    rows = []
    for i in range(1, len(lines)):
        start = max(i - CHATTERBOT_CONTEXT, (i - 1) % 2)
        roles = ["user" if (i - 1 - k) % 2 == 0 else "assistant" for k in range(start, i)]
        rows.append(([{"role": r, "content": c} for r, c in zip(roles, lines[start:i])], lines[i]))
    return rows


def _chatterbot_file(path: Path) -> list[tuple[list[dict[str, str]], str, str]]:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=YAML_LOADER) or {}
    topic = str((data.get("categories") or [path.stem])[0])
    rows = []
    for conversation in data.get("conversations") or []:
        if not isinstance(conversation, list):  # one malformed entry in trivia.yml is a bare string
            continue
        lines = [str(line).strip() if line is not None else "" for line in conversation]
        for messages, response in _chatterbot_pairs(lines):
            if response and all(m["content"] for m in messages):
                rows.append((messages, response, topic))
    return rows


def _chatterbot() -> datasets.Dataset:
    """The ChatterBot English corpus (chatterbot-corpus): 21 topic files of short Q/A conversations."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FedCustomError("instruction data 'chatterbot' needs the package chatterbot-corpus: "
                             "pip install chatterbot-corpus")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    rows = [row for path in sorted(folder.glob("*.yml")) for row in _chatterbot_file(path)]
    # The corpus repeats conversations (chatterbot-corpus 1.3.3: 2,306 rows, 1,177 distinct; one support exchange
    # 121 times): kept, a held-out split scored the model on copies of its training rows (53% of them). One row per
    # distinct (context, answer), in first-seen order
    distinct: dict[tuple[str, str], tuple] = {}
    for row in rows:
        distinct.setdefault((json.dumps(row[0], sort_keys=True), row[1]), row)
    rows = list(distinct.values())
    if not rows:
        raise FedCustomError(f"instruction data 'chatterbot': no conversations found in {folder}")
    messages, responses, topics = (list(column) for column in zip(*rows))
    return datasets.Dataset.from_dict(
        {"messages": messages, "response": responses, "topic": topics}, features=datasets.Features(FEATURES)
    )


PACKAGED_INSTRUCTIONS = {"chatterbot": _chatterbot}


def _read_source(source: str, split: str, layout: FileLayout) -> pd.DataFrame:
    """Raw rows of a file or Hub dataset (``split`` applies to Hub datasets only)."""
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise FedCustomError(f"instruction data file {source}: not found")
        return read_file(path, "instruction data file", layout)
    if path.exists():
        raise FedCustomError(f"instruction data {source}: expected a file ending in {', '.join(FILE_SUFFIXES)}")
    try:
        return datasets.load_dataset(source, split=split).to_pandas()
    except Exception as exc:  # hub errors vary (offline, missing split, gated): report the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedCustomError(
            f"instruction data {source!r}: not a packaged alias ({', '.join(PACKAGED_INSTRUCTIONS)}), not a local "
            f"{'/'.join(s[1:] for s in FILE_SUFFIXES)} file, and split {split!r} not loadable from the Hub ({first})"
        ) from None


def _text(value: Any) -> str:
    """A cell as stripped text; missing values (None, NaN) become ""."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip()


def _first(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((name for name in candidates if name in columns), None)


def _named(columns: list[str], wanted: str, role: str, source: str) -> str:
    if wanted not in columns:
        raise FedCustomError(
            f"instruction data {source}: {role} column {wanted!r} not found; columns: {', '.join(columns)}"
        )
    return wanted


def _no_rows(source: str, missing: list[int], what: str) -> FedCustomError:
    shown = ", ".join(str(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return FedCustomError(f"instruction data {source}: {len(missing)} rows have no {what} (rows {shown})")


def _turns(cell: Any, source: str, row: int) -> list[dict[str, str]]:
    """A chat cell (list of turn dicts, numpy array from Arrow, or JSON text) as role/content dicts."""
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise FedCustomError(f"instruction data {source}: row {row} chat turns are text but not JSON") from None
    turns = []
    for turn in list(cell) if cell is not None else []:
        if not isinstance(turn, dict):
            raise FedCustomError(f"instruction data {source}: row {row} has a chat turn that is not a dict: {turn!r}")
        role = ROLES.get(_text(turn.get("role", turn.get("from"))).lower())
        if role is None:
            raise FedCustomError(f"instruction data {source}: row {row} has a turn with an unknown role "
                                 f"(expected one of {', '.join(ROLES)}): {turn!r}")
        turns.append({"role": role, "content": _text(turn.get("content", turn.get("value", turn.get("text"))))})
    return turns


def _chat_rows(frame: pd.DataFrame, column: str, source: str) -> list[Row]:
    """The last assistant turn is the response; the turns before it are the messages."""
    rows, missing_prompt, missing_response = [], [], []
    for i, cell in enumerate(frame[column]):
        turns = _turns(cell, source, i)
        last = max((k for k, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None or not turns[last]["content"]:
            missing_response.append(i)
        elif not any(t["role"] == "user" and t["content"] for t in turns[:last]):
            missing_prompt.append(i)
        rows.append((turns[:last] if last is not None else turns, turns[last]["content"] if last is not None else ""))
    if missing_prompt:
        raise _no_rows(source, missing_prompt, "user turn before the last assistant turn")
    if missing_response:
        raise _no_rows(source, missing_response, "assistant turn (the response)")
    return rows


def _text_rows(frame: pd.DataFrame, prompt: str, response: str, extra: str | None, source: str) -> list[Row]:
    """Prompt (joined with a non-empty ``extra`` input) as the user message; an optional system message."""
    prompts, responses = [_text(v) for v in frame[prompt]], [_text(v) for v in frame[response]]
    extras = [_text(v) for v in frame[extra]] if extra else [""] * len(frame)
    systems = [_text(v) for v in frame[SYSTEM_COLUMN]] if SYSTEM_COLUMN in frame.columns else [""] * len(frame)
    missing = [i for i, p in enumerate(prompts) if not p]
    if missing:
        raise _no_rows(source, missing, f"instruction (column {prompt!r})")
    missing = [i for i, r in enumerate(responses) if not r]
    if missing:
        raise _no_rows(source, missing, f"response (column {response!r})")
    rows = []
    for text, answer, more, system in zip(prompts, responses, extras, systems):
        user = {"role": "user", "content": f"{text}\n\n{more}" if more else text}
        rows.append(([{"role": "system", "content": system}, user] if system else [user], answer))
    return rows


def _canonical_rows(
    frame: pd.DataFrame, source: str, prompt_column: str | None, response_column: str | None
) -> tuple[list[Row], set[str]]:
    """Rows plus the source columns they consumed (the rest are kept as metadata)."""
    columns = [str(c) for c in frame.columns]
    chat = _first(columns, CHAT_COLUMNS)
    if chat and prompt_column is None and response_column is None:
        return _chat_rows(frame, chat, source), {chat}
    prompt = _named(columns, prompt_column, "prompt", source) if prompt_column else _first(columns, PROMPT_COLUMNS)
    response = (_named(columns, response_column, "response", source) if response_column
                else _first(columns, RESPONSE_COLUMNS))
    if prompt is None or response is None:
        raise FedCustomError(
            f"instruction data {source}: no recognised columns among {', '.join(columns)}; expected {SCHEMAS}"
        )
    extra = _first([c for c in columns if c not in (prompt, response)], INPUT_COLUMNS) if not prompt_column else None
    rows = _text_rows(frame, prompt, response, extra, source)
    return rows, {prompt, response, SYSTEM_COLUMN} | ({extra} if extra else set())


def _metadata(frame: pd.DataFrame, used: set[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Topics ("" without a topic column) and the other scalar columns as strings."""
    columns = [str(c) for c in frame.columns]
    topic = _first([c for c in columns if c not in used], TOPIC_COLUMNS)
    topics = [_text(v) for v in frame[topic]] if topic else [""] * len(frame)
    kept = {}
    for name in columns:
        if name in used or name == topic or name in CANONICAL:
            continue
        values = frame[name].tolist()
        if all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            kept[name] = [_text(v) for v in values]
    return topics, kept


def load_instructions(
    source: str, split: str = "train", prompt_column: str | None = None, response_column: str | None = None,
    layout: FileLayout = FileLayout(),
) -> datasets.Dataset:
    """Rows ``messages`` (chat turns before the response), ``response`` and ``topic``, plus metadata columns.

    ``source`` is a packaged alias (``chatterbot``), a local file or a Hub dataset name; ``split`` is used
    for Hub datasets only. ``prompt_column``/``response_column`` override schema detection (a chat column is
    then ignored, and naming ``prompt_column`` also stops an ``input``/``context`` column being joined in).
    """
    if source in PACKAGED_INSTRUCTIONS:
        return PACKAGED_INSTRUCTIONS[source]()
    frame = _read_source(source, split, layout)
    if len(frame) == 0:
        raise FedCustomError(f"instruction data {source}: no rows")
    rows, used = _canonical_rows(frame, source, prompt_column, response_column)
    topics, kept = _metadata(frame, used)
    messages, responses = [m for m, _ in rows], [r for _, r in rows]
    features = datasets.Features({**FEATURES, **{name: datasets.Value("string") for name in kept}})
    return datasets.Dataset.from_dict(
        {"messages": messages, "response": responses, "topic": topics, **kept}, features=features
    )
