"""Runtimes move messages; the embedded one runs everything in this process."""

from fedcustom.runtime.embedded import EmbeddedRuntime, SimulatedFaults
from fedcustom.runtime.messages import Handler, Message, Reply, Runtime

__all__ = ["EmbeddedRuntime", "SimulatedFaults", "Handler", "Message", "Reply", "Runtime"]
