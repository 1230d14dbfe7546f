"""Natural non-IID split by a metadata column: every distinct value (a topic, a category) lives on one client.

Data owners with different interests are modelled by skewing topics rather than labels: FedIT
(Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction Tuning") skews
Dolly-15k's category column across clients. Here each value goes wholly to one client, the extreme
and assumption-free form of that skew, decided by the data's own metadata.
"""

from __future__ import annotations

import heapq

import numpy as np

from fedcustom.errors import FedCustomError


def partition_by_column(values: list[str], num_clients: int, seed: int) -> list[list[int]]:
    """Row indices per client; each distinct value goes wholly to one client.

    Distinct values are shuffled with ``seed`` and handed out greedily, each to the client with the
    fewest rows so far (ties to the lowest client number), so sizes stay as even as whole groups allow
    and every client gets at least one value.
    """
    if num_clients < 1:
        raise FedCustomError(f"partition by column: need at least one client, got {num_clients}")
    groups: dict[str, list[int]] = {}
    for row, value in enumerate(values):
        groups.setdefault(value, []).append(row)
    if len(groups) < num_clients:
        raise FedCustomError(
            f"partition by column: {len(groups)} distinct values cannot cover {num_clients} clients "
            "(each value goes wholly to one client); use fewer clients or another column"
        )
    order = sorted(groups)  # a fixed order before shuffling, so the seed alone decides the split
    shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    heap = [(0, client) for client in range(num_clients)]  # (rows so far, client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for value in shuffled:
        size, client = heapq.heappop(heap)
        parts[client].extend(groups[value])
        heapq.heappush(heap, (size + len(groups[value]), client))
    return [sorted(part) for part in parts]
