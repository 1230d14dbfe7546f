"""A persistent per-node worker: the process that runs a SuperNode's ClientApp tasks, keeping the backbone, tokenizer,
data and client state loaded between messages (issue 20).

Flower 1.41's SuperNode hands each message to a task process: by default its SuperExec starts a fresh
``flwr-clientapp`` process per message, which installs the FAB, imports torch and transformers and loads the model
again (about 5 s per message on 2 cores). A SuperNode started with ``--isolation process`` instead waits for an
external SuperExec on its local Runtime API. ``fedcustom worker`` is that SuperExec, and runs each task in itself
with Flower's own task protocol (acquire a task and its token, pull the message and context, push the reply and
context), so the node keeps Flower's node authentication and TLS to the SuperLink unchanged and opens no port:
the worker connects to the node's Runtime API on 127.0.0.1, optionally authenticated with the node's SuperExec
secret (a file only the node's user can read).

The node's state still travels in Flower's ``context`` after every message, so a worker that is killed and
restarted continues from where the node was. By default a worker serves every run, one after another, and drops
what it keeps loaded for a run when a message of another run arrives (memory stays one run's); with ``--run`` it
serves only that run and answers any other run's message with an error instead of running it.

Each task runs on its own thread, as Flower's SuperExec runs each in its own process. A SuperNode hands out one
live task at a time, but Flower 1.41 can leave an orphan: a message that arrives while its run stops (a killed
ServerApp) gets a task whose message objects never come, and pulling them waits up to Flower's ``PULL_MAX_TIME``
(two hours). Served in line, that task would hold back every later run's messages; on its own thread it does not.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcustom.deploy.flower.pulls import quicker_object_pulls
from fedcustom.deploy.flower.wake import WakeClient, WakeServer

if TYPE_CHECKING:
    from fedcustom.deploy.flower.unserved import UnservedReplies

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    runtime_api: str = "127.0.0.1:9094"  # the SuperNode's Runtime API (flower-supernode --port)
    insecure: bool = True  # plain HTTP on the loopback (TLS: root_certificates)
    root_certificates: str | None = None
    auth_secret_file: str | None = None  # the SuperNode's --superexec-auth-secret-file
    run_id: int | None = None  # serve only this run (default: every run, one after another)
    poll_seconds: float = 0.05  # how often to ask the node for a task right after a task (then backing off)
    max_poll_seconds: float = 0.5  # the longest wait between asks when idle
    threads: int | None = None  # torch threads (nodes sharing one machine: its cores divided between them)
    max_tasks: int | None = None  # stop after this many tasks (tests)
    wake_socket: str | None = None  # the node's --wake-socket: woken for each message instead of polling


def _client(settings: WorkerSettings, interceptors: list[Any], retry_invoker: Any = None) -> Any:
    """A Runtime API client of the node (``retry_invoker``: Flower's simple HTTP invoker unless given)."""
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certificates = Path(settings.root_certificates).read_bytes() if settings.root_certificates else None
    return RuntimeHttpClient.from_server_address(server_address=settings.runtime_api, insecure=settings.insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=retry_invoker or make_simple_http_retry_invoker())


def serve(settings: WorkerSettings) -> int:
    """Acquire and run the node's ClientApp tasks until interrupted (or ``max_tasks``); returns the tasks run."""
    wake = WakeClient(settings.wake_socket) if settings.wake_socket else None
    if wake is not None:
        wake.connect()  # before the imports below (seconds): from now on the node knows its worker is alive

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

    from fedcustom.deploy.flower.apps import client_app  # torch and transformers load once, here
    from fedcustom.deploy.flower.node import serve_persistently

    serve_persistently()

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if settings.auth_secret_file:
        from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

        secret = load_superexec_auth_secret(secret_file=settings.auth_secret_file)
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    node = _client(settings, interceptors)
    backoff = Backoff(settings.poll_seconds, settings.max_poll_seconds)
    served, started = _Served(), 0
    running: list[threading.Thread] = []
    print(f"fedcustom worker: serving the SuperNode at {settings.runtime_api}", flush=True)
    try:
        while settings.max_tasks is None or started < settings.max_tasks:
            acquired = node.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                           agentapp_fab_hashes=[]))
            if not (acquired.HasField("task") and acquired.token):
                if wake is not None:
                    wake.wait(settings.max_poll_seconds)  # the node wakes us; the timeout is the fallback poll
                else:
                    backoff.wait()
                continue
            backoff.reset()
            task = threading.Thread(target=_run_then_reset,
                                    args=(settings, acquired.token, client_app, served, backoff, wake),
                                    name=f"task-{acquired.task.task_id}", daemon=True)
            task.start()
            started += 1
            running = [t for t in running if t.is_alive()] + [task]
        for task in running:
            task.join()
    finally:
        node.close()
        if wake is not None:
            wake.close()
    return started


class _Served:
    """The run whose clients this worker keeps loaded (tasks run on their own threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run_id: int | None = None

    def switch_to(self, run_id: int) -> None:
        """Serve ``run_id``: a message of another run than the last one drops that run's clients."""
        with self.lock:
            if self.run_id is not None and run_id != self.run_id:
                forget_other_runs(run_id)
            self.run_id = run_id


def forget_other_runs(run_id: int) -> None:
    """Drop the clients this process built for runs other than ``run_id`` (their models, data and indexes)."""
    from fedcustom.deploy.flower import node, rag

    for cache in (node._CLIENTS, rag._CLIENTS):
        for key in [k for k in cache if k[0] != run_id]:
            del cache[key]


def run_task(settings: WorkerSettings, token: str, app: Any, served: _Served) -> None:
    """One task with its token, as ``flwr-clientapp`` runs it but in this process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from fedcustom.deploy.flower.task_client import task_heartbeat, task_retry_invoker

    # (Flower's task helpers interrupt the process when the node rejects the token: fatal for a worker, see there)
    client = _client(settings, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                                RuntimeTokenHttpInterceptor(token)], task_retry_invoker())
    heartbeat = HeartbeatSender(task_heartbeat(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "the worker failed before the task ran"
    try:
        message, context, _run, _fab = pull_task_input(client)
        if settings.run_id is not None and context.run_id != settings.run_id:
            reason = f"this fedcustom worker serves run {settings.run_id}, not run {context.run_id}"
            reply, details = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                     reply_to=message), reason
            log.warning("refused a message of run %s: %s", context.run_id, reason)
        else:
            served.switch_to(context.run_id)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - a task's failure is its reply, and the worker goes on
        log.exception("task failed")
        details = f"{type(exc).__name__}: {exc}"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            heartbeat.stop()
            client.close()


def _run_then_reset(settings: WorkerSettings, token: str, app: Any, served: _Served, backoff: Backoff,
                    wake: WakeClient | None = None) -> None:
    """Run the task, tell the node its reply is there, then poll fast again: the server's next message usually
    follows its reply closely."""
    try:
        run_task(settings, token, app, served)
    finally:
        if wake is not None:
            wake.reply_pushed()
        backoff.reset()


class Backoff:
    """Idle polling: waits start at ``low`` seconds and double up to ``high`` while nothing arrives; ``reset`` after
    work. Each poll costs both sides a request (about 7 ms of CPU each here: two idle nodes polling their SuperLink
    20 times a second kept 65% of a core busy), while messages that follow each other closely (split learning's
    batches, SecAgg+'s stages, the next round) still meet a fast poll."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, max(low, high)
        self.current = low

    def wait(self) -> None:
        time.sleep(self.current)
        self.current = min(self.current * 2, self.high)

    def reset(self) -> None:
        self.current = self.low


class _NodeSleep:
    """``time`` for Flower's SuperNode loop: its 3 s wait between empty pulls from the SuperLink becomes a backoff
    from ``poll`` to ``max_poll`` seconds, its 0.5 s waits for a task's reply become ``poll`` (and reset the backoff,
    since the node is busy and the server's next message will follow the reply), ended early when a worker says
    on the wake socket that its reply is there; ``unserved`` looks at the awaited message at each of those waits."""

    IDLE_SECONDS = 3  # Flower 1.41's wait after a pull that found no message

    def __init__(self, poll: float, max_poll: float, wake: WakeServer | None = None,
                 unserved: UnservedReplies | None = None) -> None:
        self.poll, self.backoff, self.wake, self.unserved = poll, Backoff(poll, max_poll), wake, unserved

    def sleep(self, seconds: float) -> None:
        if seconds >= self.IDLE_SECONDS:
            self.backoff.wait()
            return
        self.backoff.reset()
        if self.unserved is not None and self.unserved.check():
            return  # the reply is there now
        if self.wake is not None and self.wake.connected:
            self.wake.wait_for_reply(min(seconds, self.poll))
        else:
            time.sleep(min(seconds, self.poll))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def run_supernode(argv: list[str], poll: float, max_poll: float = 0.5, wake_socket: str | None = None,
                  worker_grace: float = 5.0) -> None:
    """Flower's own SuperNode (``flower-supernode ARGV``: the same authentication, TLS and node config) whose waits
    between pulls from the SuperLink (``poll`` backing off to ``max_poll`` while idle) and for a task's reply
    (``poll``) replace Flower 1.41's fixed 3 s and 0.5 s. Those fixed waits put 1.5 s on average (up to 3.5 s) on
    every message a node receives, which is most of a round once the worker removes the per-message process.
    With ``wake_socket`` the node also wakes its workers for each message it stores (:mod:`.wake`), and, with
    ``--isolation process``, answers a message with an error once no worker has been connected for
    ``worker_grace`` seconds (:mod:`.unserved`)."""
    import sys

    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedcustom.deploy.flower.unserved import UnservedReplies

    quicker_object_pulls()  # the node pulls each message's objects from the SuperLink
    wake = WakeServer(wake_socket) if wake_socket else None
    unserved = UnservedReplies(wake, worker_grace) if wake is not None and _external_executor(argv) else None
    loop.time = _NodeSleep(poll, max_poll, wake, unserved)  # the module's only use of ``time``: sleeping
    if wake is not None:
        loop._pull_and_store_message = _storing_and_waking(loop._pull_and_store_message, wake, unserved)
    sys.argv = ["flower-supernode", *argv]
    try:
        flower_supernode()
    finally:
        if wake is not None:
            wake.close()


def _external_executor(argv: list[str]) -> bool:
    """Whether ``flower-supernode ARGV`` leaves its tasks to an external executor (``--isolation process``)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--isolation")
    return parser.parse_known_args(argv)[0].isolation == "process"


def _storing_and_waking(pull_and_store: Any, wake: WakeServer, unserved: UnservedReplies | None) -> Any:
    """The node loop's ``_pull_and_store_message`` (looked up by name at each call, always with keywords), which
    then wakes the workers for the stored message and has ``unserved`` watch it."""
    from fedcustom.deploy.flower.unserved import started

    def pull_store_and_wake(**kwargs: Any) -> int | None:
        received: list[Any] = []
        receive, since = kwargs["receive"], started()

        def receive_and_keep() -> Any:
            pulled = receive()
            if pulled is not None:
                received.append(pulled[0])
            return pulled

        run_id = pull_and_store(**{**kwargs, "receive": receive_and_keep})
        if run_id is not None:  # a message (and its task) is stored: its worker can take it now
            wake.task_stored()
            if unserved is not None and received:
                unserved.track(kwargs["state"], kwargs["object_store"], received[0], since)
        return run_id

    return pull_store_and_wake
