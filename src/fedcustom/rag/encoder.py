"""Text to unit vectors with a Hugging Face encoder: mean pooling over real tokens, then L2 normalisation (as
sentence-transformers does for all-MiniLM-L6-v2), so an inner product is the cosine similarity.

The encoder may be a retriever customized with ``fedcustom run --task retrieval``: its ``model/`` folder (full
fine-tuning) is an ordinary encoder; its ``adapter/`` folder (LoRA, prompt, prefix) is loaded onto its base model
and embeds exactly as in training (a prefix or soft prompt cannot be merged into the weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcustom.errors import FedCustomError

DEFAULT_ENCODER = "minilm"  # the packaged sentence-transformers/all-MiniLM-L6-v2
ENCODE_BATCH = 64
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on passages up to 256 word pieces


@dataclass
class Encoder:
    """A loaded encoder; ``name`` is what an index records, so a query with another encoder is refused."""

    name: str
    max_tokens: int = MAX_TOKENS
    device: str = "cpu"
    _model: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _adapted: Any = field(default=None, repr=False)  # a retrieval adapter around _model (its forward embeds)

    def __post_init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from fedcustom.models import load_tokenizer, packaged_alias, quiet_transformers, resolve_model

        quiet_transformers()
        folder = Path(self.name).expanduser()
        base = self.name
        if (folder / "adapter_config.json").is_file():
            base = str(json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or "")
            if not base:
                raise FedCustomError(f"--encoder {self.name}: the adapter names no base model")
            base = packaged_alias(base) or base  # a packaged model, named by its Hub id: the copy it was trained on
        try:
            own = base != self.name and (folder / "tokenizer_config.json").is_file()  # an adapter saved with its tokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder)) if own else load_tokenizer(base)
            self._model = AutoModel.from_pretrained(resolve_model(base)).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise FedCustomError(f"--encoder {self.name}: not a loadable Hugging Face encoder ({exc})") from None
        if base != self.name:
            from peft import PeftModel

            from fedcustom.rag.contrastive import ContrastiveEncoder

            self._adapted = PeftModel.from_pretrained(ContrastiveEncoder(self._model), str(folder)).to(self.device)
            self._adapted.eval()
        limit = getattr(self._model.config, "max_position_embeddings", None)
        if limit:
            self.max_tokens = min(self.max_tokens, int(limit))

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = ENCODE_BATCH) -> np.ndarray:
        """float32 array (len(texts), dim) of unit vectors."""
        import torch  # here, so that the CLI parser can import this module's constants without loading torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                self._encode_batch(texts[start:start + batch_size], out[start:start + batch_size])
        return out

    def _encode_batch(self, texts: list[str], out: np.ndarray) -> None:
        from fedcustom.rag.contrastive import mean_pool  # torch loads with the model, not with this module

        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt").to(self.device)
        if self._adapted is not None:
            out[:] = self._adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).embeddings.cpu()
            return
        hidden = self._model(**batch).last_hidden_state
        out[:] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
