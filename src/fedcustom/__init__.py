"""fedcustom: federated customization of large models (full FT, LoRA, prompt and prefix tuning)."""

__version__ = "0.1.0"
