"""Errors a user can cause. The CLI turns these into one-line messages and exit code 2."""

from __future__ import annotations


class FedCustomError(Exception):
    """A problem with user input (config, files, models, data): message names the input."""


class ConfigError(FedCustomError):
    """A config key or value is unknown or out of range."""


class UpdateRejected(Exception):
    """A client's update failed decoding or validation; the server drops it for the round."""


class PayloadError(ValueError):
    """Bytes on the wire could not be decoded into named tensors."""
