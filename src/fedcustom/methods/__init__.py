"""Customization methods, registered by name. Importing this package registers all of them."""

from fedcustom.methods import distill, full, head, lora, prefix, prompt, split  # noqa: F401  (registration side effect)
from fedcustom.methods.base import (
    Method,
    get_method,
    load_trainable_state,
    method_names,
    save_trained,
    trainable_state,
)

__all__ = ["Method", "get_method", "load_trainable_state", "method_names", "save_trained", "trainable_state"]
