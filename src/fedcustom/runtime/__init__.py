"""Runtimes move messages; the embedded one runs everything in this process."""

from fedcustom.runtime.embedded import EmbeddedRuntime
from fedcustom.runtime.messages import Handler, Message, Reply, Runtime

__all__ = ["EmbeddedRuntime", "Handler", "Message", "Reply", "Runtime"]
