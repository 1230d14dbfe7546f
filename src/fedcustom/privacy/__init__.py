"""Privacy between codec and strategy: client-level DP (clipping, Gaussian noise, accountant)."""

from fedcustom.privacy.dp import (
    CentralDP,
    PrivacyAccountant,
    State,
    clip_update,
    gaussian_noise_like,
    noise_generator,
    privatize_locally,
    update_norm,
)

__all__ = [
    "CentralDP",
    "PrivacyAccountant",
    "State",
    "clip_update",
    "gaussian_noise_like",
    "noise_generator",
    "privatize_locally",
    "update_norm",
]
