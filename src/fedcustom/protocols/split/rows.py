"""Split learning's weight exchanges as changed rows only: exact, and a third of the bytes for a full client half.

A SplitFed round moves the whole client half twice per client: the global half down at ``split_begin`` and the
trained half up with the client's last reply (about 68 MB for MiniLM at cut layer 3, 47 MB of it the word embeddings). Most of
it does not change: a client's optimizer leaves every embedding row of a token it never saw bit for bit as it was
(AdamW without weight decay steps a row by its moments, which stay zero while its gradient is zero), and FedAvg's
float64 mean returns identical inputs exactly. So each direction sends only what differs from a copy both ends
already hold, and the receiver rebuilds the rest from that copy:

- up: the trained half against the global half the client received at ``split_begin`` in the same round;
- down: the new global half against the version the node received last time, kept in memory by a persistent
  node (the embedded runtime, a `fedcustom worker`, Flower's simulation); the server remembers which rows changed
  from one version to the next (a bool per row), not the versions themselves.

Rows are slices along a tensor's first dimension (an embedding's vocabulary rows; a 1-d tensor's elements) and are
compared by their bytes, so what arrives is exactly what was sent: no difference is computed in floating point. A
tensor whose changed rows are more than half of it travels whole. This is no lossy codec: the results are those
of sending every tensor whole (tested), only the bytes on the wire differ.
"""

from __future__ import annotations

import torch

from fedcustom.errors import PayloadError

State = dict[str, torch.Tensor]
Rows = dict[str, torch.Tensor]  # name -> bool per row along dim 0 (a 0-d tensor: one "row")
INDEX, VALUES = "rows.index/", "rows.values/"  # wire keys of a tensor sent as some of its rows
WHOLE_ABOVE = 0.5  # a tensor with more than this fraction of its rows changed travels whole


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, one row per slice along dim 0: (rows, bytes per row)."""
    flat = tensor.detach().reshape(max(1, tensor.shape[0]) if tensor.dim() else 1, -1).contiguous()
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)


def changed_rows(new: State, base: State) -> Rows:
    """Which rows of each tensor of ``new`` differ from ``base`` in any bit (a name or shape ``base`` lacks: all)."""
    rows: Rows = {}
    for name, value in new.items():
        old = base.get(name)
        count = value.shape[0] if value.dim() else 1
        if old is None or old.shape != value.shape or old.dtype != value.dtype:
            rows[name] = torch.ones(count, dtype=torch.bool)
        else:
            rows[name] = (_as_rows(value) != _as_rows(old)).any(dim=1) if count else torch.zeros(0, dtype=torch.bool)
    return rows


def union(first: Rows, second: Rows) -> Rows:
    """Rows changed in either (e.g. over two rounds)."""
    rows = dict(first)
    for name, mask in second.items():
        rows[name] = rows[name] | mask if name in rows else mask
    return rows


def encode_rows(state: State, rows: Rows) -> State:
    """The wire dict: each changed tensor whole (under its own name) or as its changed rows (``rows.index/NAME``,
    int64, and ``rows.values/NAME``); unchanged tensors (no rows set, or not in ``rows``) are left out."""
    wire: State = {}
    for name, value in state.items():
        mask = rows.get(name)
        changed = 0 if mask is None else int(mask.sum())
        if changed == 0:
            continue
        if value.dim() == 0 or changed > WHOLE_ABOVE * len(mask):
            wire[name] = value
        else:
            index = mask.nonzero().flatten()
            wire[INDEX + name], wire[VALUES + name] = index, value[index]
    return wire


def decode_rows(base: State, wire: State) -> State:
    """Inverse of :func:`encode_rows` against the same ``base``: every tensor of ``base``, with what ``wire`` sends
    in place of its rows. PayloadError for a name ``base`` lacks, a shape or dtype that does not fit it, or a row
    index out of range; unchanged tensors are ``base``'s own (not copied: neither side writes into them)."""
    state = dict(base)
    for key, value in wire.items():
        if key.startswith(VALUES):
            continue
        name = key[len(INDEX):] if key.startswith(INDEX) else key
        if name not in base:
            raise PayloadError(f"rows for {name!r}, which the client half does not have")
        if key.startswith(INDEX):
            state[name] = _put_rows(name, base[name], value, wire.get(VALUES + name))
        else:
            _check_fits(name, value, base[name].shape, base[name].dtype)
            state[name] = value
    orphans = [k for k in wire if k.startswith(VALUES) and INDEX + k[len(VALUES):] not in wire]
    if orphans:
        raise PayloadError(f"row values without their row indices: {orphans[:3]}")
    return state


def _put_rows(name: str, base: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    if base.dim() == 0 or index.dim() != 1 or index.dtype != torch.int64:
        raise PayloadError(f"{INDEX}{name}: expected a 1-d int64 tensor of row numbers of a tensor with rows")
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= base.shape[0]):
        raise PayloadError(f"{INDEX}{name}: row numbers must lie in [0, {base.shape[0]})")
    if values is None:
        raise PayloadError(f"{INDEX}{name} comes without {VALUES}{name}")
    _check_fits(VALUES + name, values, (len(index), *base.shape[1:]), base.dtype)
    out = base.clone()
    out[index] = values
    return out


def _check_fits(name: str, value: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> None:
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise PayloadError(f"{name}: shape {tuple(value.shape)} {value.dtype}, expected {tuple(shape)} {dtype}")


class VersionHistory:
    """The server's record of how the global client half changed, to send each node only the rows that changed since
    the version it holds. Versions are ``"{token}:{n}"``: the token is new for every server (a resumed run starts
    a new one), so a node never applies rows to a version of another run or of a round the checkpoint lost."""

    def __init__(self, token: str, keep: int = 64) -> None:
        self.token, self.keep = token, keep
        self.number = 0  # the current version's number
        self.changes: dict[int, Rows] = {}  # version n -> rows that changed from n - 1 to n
        self.held: dict[int, int] = {}  # node -> the version number it said it keeps

    @property
    def current(self) -> str:
        return f"{self.token}:{self.number}"

    def advance(self, new: State, old: State) -> None:
        """The global half became ``new`` (from ``old``)."""
        self.number += 1
        self.changes[self.number] = changed_rows(new, old)
        self.changes.pop(self.number - self.keep, None)

    def rows_since(self, node: int) -> tuple[str, Rows] | None:
        """The version ``node`` holds and the rows changed since, or None when it holds none we can build on."""
        held = self.held.get(node)
        if held is None or any(n not in self.changes for n in range(held + 1, self.number + 1)):
            return None
        rows: Rows = {}
        for n in range(held + 1, self.number + 1):
            rows = union(rows, self.changes[n])
        return f"{self.token}:{held}", rows

    def kept(self, node: int, number: int | None) -> None:
        """``node`` keeps version ``number`` of this server's (None: it keeps none)."""
        if number is None:
            self.held.pop(node, None)
        else:
            self.held[node] = number
