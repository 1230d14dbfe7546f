"""Runtimes move messages; the embedded one runs everything in this process."""

from fedcustom.runtime.embedded import EmbeddedRuntime, SimulatedFaults
from fedcustom.runtime.messages import ClientSetup, Handler, Message, Reply, Runtime

__all__ = ["ClientSetup", "EmbeddedRuntime", "SimulatedFaults", "Handler", "Message", "Reply", "Runtime"]
