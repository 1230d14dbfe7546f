"""The generator: a causal LM (the packaged SmolLM2 by default, any Hub/local one, or a generative run's adapter)
answering a question with the merged passages in its prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcustom.errors import FedCustomError

DEFAULT_GENERATOR = "smollm2"
SYSTEM = "Answer the question in one short sentence. Use the context if it helps."
MAX_PASSAGE_CHARS = 600  # a long passage is cut so that k of them fit a small model's context


def prompt_messages(question: str, passages: list[str]) -> list[dict[str, str]]:
    """Chat messages for one question; without passages, the question alone (the no-retrieval baseline)."""
    if not passages:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    context = "\n".join(f"[{i}] {p[:MAX_PASSAGE_CHARS]}" for i, p in enumerate(passages, 1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]


@dataclass
class Generator:
    """``model``: an alias, local folder or Hub name of a causal LM; ``adapter``: a PEFT adapter folder from
    ``fedcustom run --task causal-lm`` (its backbone: ``model`` or the adapter's own)."""

    model: str = DEFAULT_GENERATOR
    adapter: str | None = None
    max_new_tokens: int = 48
    device: str = "cpu"
    _lm: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FedCustomError(f"--max-new-tokens {self.max_new_tokens}: expected a whole number >= 1")
        if self.adapter:
            from fedcustom.generate_cli import load_for_generation

            self._lm, self._tokenizer = load_for_generation(self.adapter, self.model)
        else:
            from fedcustom.models import load_causal_lm, load_tokenizer, quiet_transformers

            quiet_transformers()
            self._tokenizer = load_tokenizer(self.model)
            self._lm = load_causal_lm(self.model, self._tokenizer)
        self._lm.to(self.device).eval()

    def answer(self, questions: list[str], contexts: list[list[str]]) -> list[str]:
        """One greedy answer per question, each with its own passages (an empty list: no retrieval)."""
        from fedcustom.generation import chat_prompt, generate

        raw = not getattr(self._tokenizer, "chat_template", None)
        prompts = [chat_prompt(self._tokenizer, prompt_messages(q, c), raw=raw) for q, c in zip(questions, contexts)]
        return generate(self._lm, self._tokenizer, prompts, max_new_tokens=self.max_new_tokens)
