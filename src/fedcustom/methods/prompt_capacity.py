"""Per-client prompt and prefix lengths (``--prefix-lengths``) for prompt tuning and prefix tuning.

Every client holds the prompt encoder at its full length P (``--num-virtual-tokens``); a client of length L uses
only the first L virtual tokens. PEFT reads the length from the adapter's config and the token ids it looks up
from ``PeftModel.prompt_tokens``, so ``apply`` sets both to L: the client's forward and backward really run with L
virtual tokens (less attention compute and activation memory, which is why a slow or small device gets a short
prefix), and rows L.. of the prompt embedding get no gradient. Before the update leaves the client, those rows
are put back to the values it received (``outgoing``: AdamW's decoupled weight decay would otherwise shrink them),
so they carry nothing, and the server averages each position over the clients that hold it
(``fedcustom.strategies.positions``). The global model (node None) uses all P tokens.

``adaptive`` picks each client's length from its device profile: P times the smaller of its compute and its
memory relative to the most capable profile (memory only when every profile gives ``memory_mb``), at least 1.
"""

from __future__ import annotations

import torch
from torch import nn

from fedcustom.config import RunConfig
from fedcustom.errors import ConfigError
from fedcustom.personalize import is_virtual_token_table

WHERE = "method.prefix_lengths (--prefix-lengths)"
ADAPTIVE = "adaptive"
PROMPT_METHODS = ("prefix", "prompt")


def parse_lengths(text: str, full_length: int) -> list[int] | str:
    """``"4,8,16"`` -> [4, 8, 16] (each in 1 .. ``full_length``); ``"adaptive"`` -> "adaptive"; empty -> []."""
    text = str(text).strip()
    if not text:
        return []
    if text == ADAPTIVE:
        return ADAPTIVE
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{WHERE}: {text!r}; expected comma-separated integers such as 4,8,16, or "
                          f"{ADAPTIVE!r} (from --client-profiles)") from None
    return check_lengths(lengths, full_length, f"{WHERE}: {text!r}")


def check_lengths(lengths: list[int], full_length: int, where: str) -> list[int]:
    """``lengths`` when each is in 1 .. ``full_length``, else a ConfigError naming ``where`` they came from."""
    if any(not 1 <= n <= full_length for n in lengths):
        raise ConfigError(f"{where}; each length must be between 1 and the adapter's --num-virtual-tokens "
                          f"{full_length}")
    return lengths


def adaptive_lengths(compute: list[float], memory: list[float | None], full_length: int) -> list[int]:
    """Each device's length: ``full_length`` x min(compute / max compute, memory / max memory), at least 1
    (memory counts only when every device gives it)."""
    shares = [c / max(compute) for c in compute]
    if memory and all(m is not None for m in memory):
        top = max(float(m) for m in memory)  # type: ignore[arg-type]
        shares = [min(s, float(m) / top) for s, m in zip(shares, memory)]  # type: ignore[arg-type]
    return [max(1, min(full_length, round(full_length * s))) for s in shares]


def is_positional(name: str, value: torch.Tensor, full_length: int) -> bool:
    """Whether tensor ``name`` is a prompt encoder's embedding with one row per virtual token."""
    return is_virtual_token_table(name) and value.shape[0] == full_length


def positional_tensors(model: nn.Module) -> list[str]:
    """The trainable tensors whose rows are the virtual tokens (prompt tuning; prefix tuning without a projection)."""
    from fedcustom.methods.base import trainable_state

    config = model.active_peft_config
    found = [name for name, value in trainable_state(model).items()
             if is_positional(name, value, config.num_virtual_tokens)]
    if not found or config.num_transformer_submodules != 1 or getattr(config, "prefix_projection", False):
        raise ConfigError(f"{WHERE}: needs a prompt or prefix encoder whose rows are its virtual tokens (a decoder or "
                          f"encoder model, no prefix projection)")
    return found


class ClientLengths:
    """Which number of virtual tokens each client uses, applied to the model when a client's state is loaded."""

    def __init__(self, model: nn.Module, lengths: list[int]) -> None:
        self.model, self.lengths = model, lengths
        self.config = model.active_peft_config
        self.full = self.config.num_virtual_tokens
        self.tensors = positional_tensors(model)

    def length(self, node_id: int | None) -> int:
        """Client ``node_id``'s number of virtual tokens (None: every token, the global model)."""
        if node_id is None or not self.lengths:
            return self.full
        return self.lengths[node_id % len(self.lengths)]

    def apply(self, node_id: int | None) -> None:
        """Make the model's forward use client ``node_id``'s first virtual tokens only."""
        length = self.length(node_id)
        self.config.num_virtual_tokens = length
        self.model.prompt_tokens[self.model.active_adapter] = torch.arange(length).long()

    def outgoing(self, node_id: int, trained: dict[str, torch.Tensor],
                 received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trained`` with the rows this client does not hold put back to the ``received`` values."""
        length = self.length(node_id)
        if length == self.full:
            return trained
        out = dict(trained)
        for name in self.tensors:
            if name in out:
                out[name] = torch.cat([trained[name][:length], received[name][length:]])
        return out


def lengths_for(cfg: RunConfig) -> list[int]:
    """Each client's number of virtual tokens, cycled over the clients ([]: all use --num-virtual-tokens): from
    --prefix-lengths, a profile file's prefix_length column, or (adaptive) its compute and memory."""
    from fedcustom.profiles import load_profiles, profile_column

    full, path = cfg.method.num_virtual_tokens, cfg.federation.client_profiles
    parsed = parse_lengths(cfg.method.prefix_lengths, full)
    if parsed == ADAPTIVE:
        if not path:
            raise ConfigError(f"{WHERE}: 'adaptive' picks each device's length from its profile; give "
                              f"--client-profiles (compute, and memory_mb if known)")
        profiles = load_profiles(path)
        return adaptive_lengths([p.compute for p in profiles], [p.memory_mb for p in profiles], full)
    from_profiles = profile_column(path, "prefix_length")
    if parsed and from_profiles:
        raise ConfigError("--client-profiles with prefix_length and --prefix-lengths: both set each client's length; "
                          "keep one")
    return parsed or check_lengths(from_profiles, full, f"--client-profiles {path}: prefix_length {from_profiles}")
