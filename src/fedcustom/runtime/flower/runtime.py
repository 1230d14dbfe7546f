"""The Runtime our servers drive, on top of a Flower Grid (a SuperLink, or Flower's simulation engine).

Our servers address clients by partition id (0..N-1), the same ids the embedded runtime uses, so
seeds and sampling match across runtimes. Flower addresses SuperNodes by random node ids; at start
this runtime asks every connected node for the partition id it was given in its node config.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from flwr.app import ConfigRecord, Message as FlowerMessage, RecordDict
from flwr.serverapp import Grid

from fedcustom.errors import FedCustomError
from fedcustom.runtime.flower.records import (SETUP_DIGEST, SETUP_MISSING, content_to_reply, message_to_content,
                                              message_type, setup_digest)
from fedcustom.runtime.messages import ClientSetup, Message, Reply

log = logging.getLogger(__name__)

HELLO = "query.fedcustom_hello"  # answered by our ClientApp with the node's partition id
REJOIN_HELLO_SECONDS = 30.0  # how long a round start waits for a newly connected node to say its partition
# Waits between pulls for replies: from FIRST_POLL_SECONDS, doubling up to POLL_SECONDS while none arrives. Flower's
# own send_and_receive sleeps 3 s between pulls, a floor on every exchange; a fixed 0.2 s still put 0.1 s on average
# on every message (split learning sends 3 per batch), while each pull costs the SuperLink one request.
FIRST_POLL_SECONDS = 0.005
POLL_SECONDS = 0.2


class FlowerRuntime:
    """Sends our messages through ``grid`` and maps replies back to partition ids."""

    def __init__(self, grid: Grid, expected_nodes: int, timeout: float, connect_timeout: float = 120.0,
                 setup: ClientSetup | None = None) -> None:
        self.grid = grid
        self.timeout = timeout  # seconds to wait for the replies of one exchange
        # what a node must know to build its client (labels, public texts) travels with the hello, once per node;
        # every message names it by its digest
        self.setup, self.setup_config = setup, setup.to_config() if setup else {}
        self.extra_config = {SETUP_DIGEST: setup_digest(self.setup_config)} if setup else {}
        self.setup_bytes = 0  # the setup's bytes sent so far: with each hello, and to each node that lost it
        self.needs_setup: set[int] = set()  # partitions whose node lost the setup: their next message carries it
        self.node_stats: dict[int, dict] = {}  # partition id -> its own rows and label histogram, as the node says
        self.partition_examples: dict[int, int] = {}  # partition id -> training rows, where the server split the data
        self._asked: set[int] = set()  # node ids asked for their partition after the start (rejoining nodes)
        self.partitions = self._discover(expected_nodes, connect_timeout)  # partition id -> Flower node id

    def _discover(self, expected: int, connect_timeout: float) -> dict[int, int]:
        """Wait until ``expected`` nodes are connected and learn which partition each one holds."""
        deadline = time.monotonic() + connect_timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
            node_ids = list(self.grid.get_node_ids())
        if len(node_ids) < expected:
            raise FedCustomError(f"federation.clients = {expected}: only {len(node_ids)} SuperNodes connected within "
                                 f"{connect_timeout:.0f} s; start one flower-supernode per client (or lower --clients)")
        partitions: dict[int, int] = {}
        for partition, node in self._hello(node_ids, connect_timeout, enough=expected):
            if partition in partitions:
                raise FedCustomError(f"SuperNodes {partitions[partition]} and {node} both have partition-id={partition} "
                                     f"in their node config; give each data owner its own partition-id")
            if not 0 <= partition < expected:
                raise FedCustomError(f"SuperNode {node} has partition-id={partition} in its node config; with "
                                     f"federation.clients = {expected} the partition ids are 0..{expected - 1}")
            partitions[partition] = node
        if len(partitions) < expected:
            raise FedCustomError(f"federation.clients = {expected}: only {len(partitions)} SuperNodes answered with "
                                 f"a partition id")
        log.info("SuperNodes by partition id: %s", partitions)
        return dict(sorted(partitions.items()))

    def _hello(self, node_ids: list[int], timeout: float, enough: int | None = None) -> list[tuple[int, int]]:
        """Ask ``node_ids`` which partition each holds: (partition, node id) for every node that answered within
        ``timeout``, or as soon as ``enough`` distinct partitions did (a dead node the SuperLink still lists would
        otherwise hold the start for the whole timeout)."""
        hello = ConfigRecord(dict(self.setup_config))
        hellos = [FlowerMessage(RecordDict({"hello": hello}), node, HELLO) for node in node_ids]
        self.setup_bytes += len(hellos) * (self.setup.wire_bytes() if self.setup else 0)
        found: list[tuple[int, int]] = []
        for reply in self._replies(self.grid.push_messages(hellos), timeout):
            if reply.has_error():
                log.warning("node %d did not say which partition it holds: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            answer = reply.content["hello"]
            partition, node = int(answer["partition-id"]), reply.metadata.src_node_id
            if "examples" in answer:  # a node with its own data file describes it (counts only, no rows)
                self.node_stats[partition] = {"client": partition, "examples": int(answer["examples"]),
                                              "label_histogram": json.loads(str(answer["label-histogram"]))}
            found.append((partition, node))
            if enough is not None and len({p for p, _ in found}) >= enough:
                break
        return found

    def _replies(self, message_ids: Iterable[str], timeout: float) -> Iterator[FlowerMessage]:
        """The replies to ``message_ids`` as they arrive, until all did or ``timeout`` seconds passed (the caller
        may stop early)."""
        waiting = set(message_ids)
        deadline = time.monotonic() + timeout
        wait = FIRST_POLL_SECONDS
        while waiting and time.monotonic() < deadline:
            arrived = False
            for reply in self.grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                arrived = True
                yield reply
            if waiting:
                wait = FIRST_POLL_SECONDS if arrived else min(2 * wait, POLL_SECONDS)
                time.sleep(wait)

    def round_trip(self) -> dict[int, float]:
        """One no-op query (the hello) to every partition's node: seconds from the push to each reply (nodes that
        did not answer within the timeout are left out). What ``fedcustom ping`` measures."""
        hellos = [FlowerMessage(RecordDict({"hello": ConfigRecord({})}), node, HELLO) for node in self.partitions.values()]
        start, seconds = time.perf_counter(), {}
        by_id = dict(zip(self.grid.push_messages(hellos), self.partitions))
        for reply in self._replies(list(by_id), self.timeout):
            if not reply.has_error():
                seconds[by_id[reply.metadata.reply_to_message_id]] = time.perf_counter() - start
        return dict(sorted(seconds.items()))

    def _rejoin(self, connected: set[int]) -> None:
        """A SuperNode restarted after its node died connects with a new node id: ask each new id once which
        partition it holds; from the next message on, the partition is served by the node that claimed it last (the
        old one may still be listed until its heartbeats lapse)."""
        new = sorted(connected - set(self.partitions.values()) - self._asked)
        if not new:
            return
        self._asked.update(new)
        for partition, node in self._hello(new, min(self.timeout, REJOIN_HELLO_SECONDS)):
            old = self.partitions.get(partition)
            if old is None:
                log.warning("SuperNode %d holds partition %d, which is not part of this run: ignored", node, partition)
                continue
            log.warning("partition %d rejoined as SuperNode %d (was %d%s); what the old node kept between rounds "
                        "(its codec link, SCAFFOLD control variate, private --personalize tensors, DP-SGD accountant) "
                        "starts again from zero on the new one", partition, node, old,
                        ", still listed" if old in connected else "")
            self.partitions[partition] = node

    @property
    def local_handler(self) -> None:
        """The clients live on the SuperNodes (each keeps its own state between messages)."""
        return None

    def nodes(self) -> list[int]:
        """Partitions whose SuperNode the SuperLink still lists (a dead node drops out after its heartbeats
        lapse, about a minute; until then its messages time out and it is left out of the round)."""
        connected = set(self.grid.get_node_ids())
        self._rejoin(connected)
        alive = [p for p, node in self.partitions.items() if node in connected]
        if len(alive) < len(self.partitions):
            log.warning("SuperNodes of partitions %s are gone", sorted(set(self.partitions) - set(alive)))
        return alive

    def stream(self, messages: dict[int, Message],
               on_reply: Callable[[int], None] | None = None) -> Iterator[tuple[int, Reply]]:
        """The replies of one exchange in node order (Flower's Grid returns them together)."""
        yield from sorted(self.send_and_receive(messages, on_reply).items())

    def send_and_receive(self, messages: dict[int, Message],
                         on_reply: Callable[[int], None] | None = None) -> dict[int, Reply]:
        """Push one message per partition, pull replies until all arrived or ``timeout`` passed; a node that did
        not answer in time gets a Reply with an error (the server rejects it and the round goes on)."""
        return self.collect(self.post(messages), on_reply)

    def post(self, messages: dict[int, Message]) -> dict[str, int]:
        """Push one message per partition now; returns message id -> partition, for :meth:`collect`."""
        unknown = sorted(set(messages) - set(self.partitions))
        if unknown:
            raise KeyError(f"partitions {unknown} have no SuperNode in this run")
        outgoing = [FlowerMessage(message_to_content(m, self.message_config(p)), self.partitions[p],
                                  message_type(m.kind), group_id=str(m.round)) for p, m in messages.items()]
        return dict(zip(self.grid.push_messages(outgoing), messages, strict=True))

    def message_config(self, partition: int) -> dict[str, str]:
        """What a message to ``partition`` adds to its config: the setup's digest, and the setup itself for a node
        that said it lost it (a SuperNode restarted under the same node id, as node authentication gives it)."""
        if partition not in self.needs_setup:
            return self.extra_config
        self.needs_setup.discard(partition)
        self.setup_bytes += self.setup.wire_bytes() if self.setup else 0
        return {**self.setup_config, **self.extra_config}

    def note_lost_setup(self, partition: int, error: str) -> None:
        """A node whose reply says it holds no setup gets it with its next message."""
        if SETUP_MISSING in error:
            log.warning("partition %d's SuperNode holds no client setup (restarted?): its next message carries it",
                        partition)
            self.needs_setup.add(partition)

    def collect(self, posted: dict[str, int], on_reply: Callable[[int], None] | None = None) -> dict[int, Reply]:
        """Pull the replies to ``posted`` until all arrived or ``timeout`` passed (from now); a node that did not answer
        in time gets a Reply with an error (the server rejects it and the round goes on)."""
        by_id = dict(posted)
        replies: dict[int, Reply] = {}
        for reply in self._replies(list(by_id), self.timeout):
            partition = by_id.pop(reply.metadata.reply_to_message_id)
            replies[partition] = self._reply(partition, reply)
            self.note_lost_setup(partition, replies[partition].error or "")
            if on_reply:
                on_reply(partition)
        for partition in by_id.values():
            replies[partition] = Reply(error=f"no reply within {self.timeout:g} s (round timeout): the SuperNode "
                                             f"{self.partitions[partition]} left or is too slow")
        if by_id:
            log.warning("no reply from partitions %s within %g s", sorted(by_id.values()), self.timeout)
        return replies

    @staticmethod
    def _reply(partition: int, reply: FlowerMessage) -> Reply:
        if reply.has_error():
            return Reply(error=f"Flower error {reply.error.code} from partition {partition}: {reply.error.reason}")
        return content_to_reply(reply.content)
