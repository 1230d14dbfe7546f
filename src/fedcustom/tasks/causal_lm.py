"""Instruction tuning of a causal LM: [prompt, response] rows (chat-templated), next-token loss on the response;
held-out perplexity, exact match and ROUGE-L of generations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedcustom.tasks.base import Metrics, Task


class CausalLM(Task):
    name = "causal-lm"
    metrics = (("rouge_l", "ROUGE-L"), ("perplexity", "perplexity"), ("exact_match", "exact match"))
    peft_task_type = "CAUSAL_LM"
    default_max_length = 512  # chat-templated prompts of the packaged corpus do not fit in 64
    instruction_data = True
    knowledge_over_vocabulary = True
    methods = ("full", "lora", "prompt", "prefix", "split", "distill")  # no head-only: the LM head is the vocabulary
    # Softened over a whole vocabulary, T = 2 teaches a causal LM to hedge (SmolLM2 on chatterbot, 1 round:
    # held-out perplexity 15.95 -> 26.2 with T = 2, -> 15.76 with T = 1).
    kd_temperature = 1.0

    def load_backbone(self, name: str, label_names: list[str], tokenizer: Any, **extra: Any) -> Any:
        from fedcustom.models import load_causal_lm

        return load_causal_lm(name, tokenizer, **extra)

    def prepare_data(self, cfg: Any, tokenizer: Any, public: Any) -> Any:
        from fedcustom.data.causal import prepare_causal_data

        tokenizer.padding_side = "right"  # training batches; generation pads on the left itself
        return prepare_causal_data(cfg.data, cfg.federation.clients, cfg.train.seed, tokenizer, cfg.model.max_length,
                                   cfg.generation.chat_template, public)

    def own_table(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        """A node's own instruction rows, chat-templated and tokenized as the server's are; topics the server does
        not know are appended after its own."""
        return self.own_rows(cfg, label_names, data_path, tokenizer).table

    def own_rows(self, cfg: Any, label_names: list[str], data_path: str, tokenizer: Any) -> Any:
        """:meth:`own_table` with each row's prompt (chat-templated) and reference answer."""
        from fedcustom.data import EvalRows
        from fedcustom.data.causal import as_rows, tokenize_rows, topic_name
        from fedcustom.data.instructions import load_instructions
        from fedcustom.data.sources import FileLayout

        tokenizer.padding_side = "right"  # training batches, as on the server
        rows = load_instructions(data_path, "train", cfg.data.text_column, cfg.data.label_column,
                                   FileLayout.of(cfg.data))
        rows = rows.map(lambda row: {"topic": topic_name(row["topic"])})
        topics = list(label_names) + sorted(set(rows["topic"]) - set(label_names))
        texts = as_rows(rows, tokenizer, topics, cfg.generation.chat_template)
        table = tokenize_rows(texts, tokenizer, cfg.model.max_length, f"this node's data-path {data_path}")
        return EvalRows(table, texts.prompts, texts.responses)

    def own_labels(self, cfg: Any, label_names: list[str], data_path: str) -> list[int | None]:
        """Each row's topic; a topic the server does not know is None (counted in examples, not the histogram)."""
        from fedcustom.data.causal import topic_name
        from fedcustom.data.instructions import load_instructions
        from fedcustom.data.sources import FileLayout

        topics = load_instructions(data_path, "train", cfg.data.text_column, cfg.data.label_column,
                                   FileLayout.of(cfg.data))["topic"]
        index = {name: i for i, name in enumerate(label_names)}
        return [index.get(topic_name(t)) for t in topics]

    def evaluator(self, cfg: Any, model: Any, rows: Any, tokenizer: Any) -> Callable[[], Metrics]:
        from fedcustom.causal_lm import GenerationSettings, evaluate_causal

        gen, batch = cfg.generation, 2 * cfg.train.batch_size
        settings = GenerationSettings(gen.max_new_tokens, gen.eval_generations, gen.samples)
        return lambda: evaluate_causal(model, rows, tokenizer, batch, settings)

    def validation_score(self, cfg: Any, model: Any, table: Any, tokenizer: Any) -> float:
        from fedcustom.causal_lm import response_loss

        return -response_loss(model, table, tokenizer, 2 * cfg.train.batch_size)

    def public_set(self, public: list, tokenizer: Any, max_length: int) -> Any:
        from fedcustom.protocols.distill.public_set import TokenPublicSet

        return TokenPublicSet(public, tokenizer, max_length)

    def task_text(self, backbone: Any) -> str:
        return "Answer the question helpfully and accurately."
