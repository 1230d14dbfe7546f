"""``--secagg`` on Flower: a round aggregated by Flower's own SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020).

The server runs Flower's :class:`SecAggPlusWorkflow` (setup, share keys, collect masked vectors, unmask) on the
run's Grid; each ClientApp runs Flower's ``secaggplus_mod`` in front of our train handler. The workflow speaks the
legacy Strategy interface, so two small adapters sit between it and our server: :class:`_Cohort` hands it our
training messages as ``FitIns`` and keeps what it aggregated; the ClientApp answers the training message with
``FitRes`` parameters holding the client's update (trained minus received tensors), which the mod weights by the
client's examples, clips to ``[-clip, clip]``, quantizes and masks before anything leaves the node. The server sees
example counts, metrics and masked vectors, and from their sum the example-weighted mean update.

Flower keeps the mod's keys and shares in ``context.state``, so the protocol survives a SuperNode's fresh process
per message. Bytes are counted from the records that travel (array data and bytes values, both directions).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow

from fedcustom.privacy.secure_round import SecureRoundOutcome
from fedcustom.runtime.flower.records import KIND, ROUND
from fedcustom.runtime.messages import Message, Reply

log = logging.getLogger(__name__)
State = dict[str, torch.Tensor]
PAYLOAD_TYPE = "fedcustom"  # tensor_type of the legacy Parameters that carry our encoded training payload
MAX_WEIGHT = 1000.0  # SecAgg+'s bound on a client's example count, unless the nodes said how many rows they hold


# ---------------------------------------------------------------------------------------------- server side
class _Node(ClientProxy):
    """The workflow addresses clients through proxies; it only reads their node id."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *args, **kwargs):  # noqa: ANN002, ANN003 - never called by the workflow
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _Cohort(Strategy):
    """The legacy Strategy the workflow calls: it trains exactly our sampled clients with our messages, and keeps
    the results (every one carries the aggregated parameters)."""

    def __init__(self, fitins: dict[int, FitIns]) -> None:
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list = []

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return [(_Node(node), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        self.results, self.failures = list(results), list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


def content_bytes(content: RecordDict) -> int:
    """Bytes of tensors and bytes values in a message's records (scalars and names not counted)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) for v in values if isinstance(v, bytes))
    return total


class _CountingGrid:
    """The run's Grid, counting the bytes of every message the workflow sends and receives, per node."""

    def __init__(self, grid) -> None:  # noqa: ANN001
        self.grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201
        messages = list(messages)
        for message in messages:
            node = message.metadata.dst_node_id
            self.down[node] = self.down.get(node, 0) + content_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                node = reply.metadata.src_node_id
                self.up[node] = self.up.get(node, 0) + content_bytes(reply.content)
        return replies

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.grid, name)


class SecAggPlusRound:
    """One FedAvg round through Flower's SecAgg+ (the Flower runtime's counterpart of
    :class:`fedcustom.privacy.secure_round.SecureRound`, with the same constructor and outcome)."""

    def __init__(self, runtime, rnd: int, chosen: list[int], like: State, clip: float,  # noqa: ANN001
                 threshold: float) -> None:
        self.runtime, self.rnd, self.chosen, self.like = runtime, rnd, chosen, like
        self.clip, self.threshold = clip, threshold

    def _max_weight(self) -> float:
        """SecAgg+'s bound on a client's example count: the largest the round's nodes reported for their own files,
        else the largest of the server's own partition (flower-sim, or nodes served the run's dataset), else
        Flower's default. A count above it overflows the ring (the mean came back scaled 5x with 5,000 rows a
        client under the default); far above the real one costs the weighted values their precision."""
        reported = {p: stats["examples"] for p, stats in self.runtime.node_stats.items()}
        for sizes in (reported, self.runtime.partition_examples):
            if sizes and all(p in sizes for p in self.chosen):
                return float(max(sizes[p] for p in self.chosen))
        return MAX_WEIGHT

    def run(self, train_messages: Callable[[list[int]], dict[int, Message]],
            on_reply: Callable[[int], None] | None = None) -> SecureRoundOutcome:
        """The workflow's four stages with our training messages in the third; the example-weighted mean update."""
        nodes = self.runtime.partitions  # partition -> Flower node id
        partition_of = {node: p for p, node in nodes.items()}
        fitins = {nodes[p]: FitIns(Parameters([m.payload], PAYLOAD_TYPE),
                                   {**m.config, **self.runtime.message_config(p), ROUND: m.round, KIND: m.kind})
                  for p, m in train_messages(self.chosen).items()}
        cohort, grid = _Cohort(fitins), _CountingGrid(self.runtime.grid)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=cohort)
        context.state.config_records["config"] = ConfigRecord({"current_round": self.rnd})
        context.state.array_records["parameters"] = ArrayRecord()
        workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=self.threshold,
                                      clipping_range=self.clip, max_weight=self._max_weight(),
                                      quantization_range=quantization_range(len(fitins)), timeout=self.runtime.timeout)
        workflow(grid, context)
        bytes_up = {p: grid.up.get(nodes[p], 0) for p in self.chosen}
        bytes_down = {p: grid.down.get(nodes[p], 0) for p in self.chosen}
        if cohort.results is None:
            reason = "secure aggregation (SecAgg+) halted: too few clients answered a stage (see the log)"
            log.warning("round %d: %s", self.rnd, reason)
            self.runtime.needs_setup.update(self.chosen)  # as for a node that dropped out (below)
            return SecureRoundOutcome(None, [], {}, dict.fromkeys(self.chosen, reason), bytes_up, bytes_down)
        replies = {partition_of[proxy.node_id]: Reply(num_examples=res.num_examples, round=self.rnd,
                                                      metrics={k: float(v) for k, v in res.metrics.items()})
                   for proxy, res in cohort.results}
        for partition in replies:
            if on_reply:
                on_reply(partition)
        rejected = {p: "dropped out of secure aggregation (SecAgg+)" for p in self.chosen if p not in replies}
        self.runtime.needs_setup.update(rejected)  # its reason does not reach us: it may have lost the client setup
        mean = unflatten_arrays(parameters_to_ndarrays(cohort.results[0][1].parameters), self.like)
        return SecureRoundOutcome(mean, sorted(replies), replies, rejected, bytes_up, bytes_down)


def quantization_range(clients: int) -> int:
    """The finest quantization whose sum over ``clients`` cannot wrap SecAgg+'s 32-bit ring: 2^(31 - ceil(log2 n)).
    Flower's default (2^22) is 128 times coarser for 3 clients, too coarse for one round's small PEFT updates once
    they are weighted by examples / max_weight."""
    return 2 ** (31 - max(1, math.ceil(math.log2(max(clients, 2)))))


def unflatten_arrays(arrays: list[np.ndarray], like: State) -> State:
    """Arrays in sorted-name order (as clients send them) back into ``like``'s names, shapes and dtypes."""
    names = sorted(like)
    if len(arrays) != len(names):
        raise ValueError(f"SecAgg+ returned {len(arrays)} arrays for {len(names)} tensors")
    return {n: torch.from_numpy(np.asarray(a)).reshape(like[n].shape).to(like[n].dtype) for n, a in zip(names, arrays)}


# ---------------------------------------------------------------------------------------------- client side
# (the ClientApp puts Flower's secaggplus_mod in front of its train handler: see apps.secaggplus_when_asked)
def fitins_to_message(content: RecordDict) -> Message:
    """Our training message inside the FitIns that SecAgg+ forwards."""
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(ins.config)
    rnd, kind = int(config.pop(ROUND)), str(config.pop(KIND))
    return Message(kind, rnd, bytes(ins.parameters.tensors[0]), config)


def update_to_fitres(update: State, num_examples: int, metrics: dict[str, float]) -> RecordDict:
    """The client's update as FitRes parameters (sorted names, float32), for the mod to weight, clip and mask."""
    arrays = [update[n].detach().to(torch.float32).numpy() for n in sorted(update)]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=False)
