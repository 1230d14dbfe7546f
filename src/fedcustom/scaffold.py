"""SCAFFOLD's control variates (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II).

    server: x, c  --(x, c)-->  client i: y <- x;  K steps of  y <- y - lr (g_i(y) + c - c_i)
    client: c_i+ = c_i - c + (x - y) / (K lr);  uploads (y, c_i+ - c_i);  keeps c_i <- c_i+
    server: x <- merge of the y's;  c <- c + (1 / N) sum_i (c_i+ - c_i)   (N: all clients; --scaffold-weights examples:
            c <- c + |S|/N sum_i (n_i / n_S) (c_i+ - c_i), weighted as the merge of the y's)

Control variates travel as a message's ``attachment`` (raw safetensors, counted in the round's bytes) beside
the method's payload, so every codec chain still encodes the model tensors alone. A client's ``c_i`` never
leaves it; it lives with the client (embedded: per node id; Flower: the node's ``context.state``).
"""

from __future__ import annotations

import torch

from fedcustom.codecs import RawCodec
from fedcustom.errors import PayloadError, UpdateRejected
from fedcustom.validation import validate_update

State = dict[str, torch.Tensor]
_RAW = RawCodec()


def zeros_like(state: State) -> State:
    """A control variate of zeros for every tensor of ``state``."""
    return {k: torch.zeros_like(v) for k, v in state.items()}


def encode(control: State) -> bytes:
    return _RAW.encode(control)


def decode(data: bytes, reference: State, what: str) -> State:
    """A control variate from the wire, checked against ``reference``'s names, shapes and dtypes."""
    if not data:
        raise UpdateRejected(f"{what}: missing (SCAFFOLD sends control variates with every update)")
    try:
        control = _RAW.decode(data)
    except PayloadError as exc:
        raise UpdateRejected(f"{what}: {exc}") from None
    try:
        validate_update(control, reference)
    except UpdateRejected as exc:
        raise UpdateRejected(f"{what}: {exc}") from None
    return control


def client_update(own: State, server: State, received: State, trained: State, steps: int, lr: float) -> State:
    """Option II: the client's new control variate ``c_i - c + (x - y) / (K lr)``."""
    if steps <= 0 or lr <= 0:
        return dict(own)
    return {k: own[k] - server[k] + (received[k] - trained[k]) / (steps * lr) for k in own}


class ServerControl:
    """The server's control variate ``c`` and its update from the clients' changes."""

    def __init__(self, state: State) -> None:
        self.c = zeros_like(state)

    def apply(self, changes: list[State], total_clients: int, examples: list[int] | None = None) -> None:
        """``c <- c + (1/N) * sum of the accepted clients' changes`` (the paper's |S|/N times their mean); with
        ``examples`` (each change's client's example count), ``|S|/N`` times their example-weighted mean instead,
        the weights the model's own merge uses."""
        shares = None if examples is None else [len(changes) / total_clients * n / sum(examples) for n in examples]
        for name, value in self.c.items():
            total = torch.zeros_like(value, dtype=torch.float64)
            for i, change in enumerate(changes):
                total += change[name].double() if shares is None else shares[i] * change[name].double()
            step = total / total_clients if shares is None else total
            self.c[name] = (value.double() + step).to(value.dtype)
