"""Wake-ups between a SuperNode and its worker over a local Unix socket, instead of polling (issue 20).

Polling has a price either way: a worker that asks its node for a task every 0.05 s costs both processes a request
each time (and with several nodes on a machine, their cores), while one that backs off to 0.5 s lets a message
wait up to 0.5 s before anyone runs it; the node's wait for the worker's reply is the same trade. Measured on 2
cores, those two waits were about a third of a message's round trip. So ``fedcustom supernode --wake-socket PATH``
listens on a Unix socket (mode 0600: only the node's own user can connect; no network port) and writes one byte
to every connected worker when it has stored a message for them (``t``); ``fedcustom worker --wake-socket PATH``
then asks for the task at once, and writes ``d`` back when it has pushed the task's reply, so the node sends it
on without waiting out its poll. The bytes carry nothing else: tasks, messages and replies still travel through
the node's Runtime API with Flower's tokens, and both sides keep polling (at ``--max-poll``) as a fallback, so a
lost wake-up or a restarted worker costs at most one poll.

A worker connects as it starts, before its imports, and stays connected until it exits, so the connection also
tells the node whether its worker is still there (:meth:`WakeServer.seconds_without_worker`): a node whose worker
is gone answers its message with an error instead of leaving the server to wait out its round timeout
(:mod:`.unserved`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

TASK, DONE = b"t", b"d"


class WakeServer:
    """The SuperNode's side: accepts its workers' connections, wakes them for each stored message, and tells the
    node's reply wait when a worker has pushed a reply."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.replied = threading.Event()  # set when a worker says it pushed a reply
        self._peers: list[socket.socket] = []
        self._lock = threading.Lock()
        self._alone_since: float | None = time.monotonic()  # when the last worker left (None: one is connected)
        self.ever_connected = False  # whether a worker has connected since the node started
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # a stale socket of a node that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600: no window in which others could connect
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(8)
        threading.Thread(target=self._accept, name="wake-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                peer, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._peers.append(peer)
                self._alone_since = None
                self.ever_connected = True
            threading.Thread(target=self._read, args=(peer,), name="wake-peer", daemon=True).start()

    def _read(self, peer: socket.socket) -> None:
        while True:
            try:
                data = peer.recv(64)
            except OSError:
                data = b""
            if not data:
                self._drop(peer)
                return
            if DONE in data:
                self.replied.set()

    def _drop(self, peer: socket.socket) -> None:
        with self._lock:
            if peer in self._peers:
                self._peers.remove(peer)
                if not self._peers:
                    self._alone_since = time.monotonic()
        with contextlib.suppress(OSError):
            peer.close()

    def task_stored(self) -> None:
        """Wake every connected worker: a message waits for them."""
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            try:
                peer.sendall(TASK)
            except OSError:
                self._drop(peer)

    def wait_for_reply(self, seconds: float) -> None:
        """Return when a worker says it pushed a reply, or after ``seconds``."""
        self.replied.wait(seconds)
        self.replied.clear()

    @property
    def connected(self) -> int:
        with self._lock:
            return len(self._peers)

    def seconds_without_worker(self) -> float:
        """How long no worker has been connected (0 while one is): a worker connects when it starts and stays
        connected until it exits, so this is how long the node has had nobody to run its messages."""
        with self._lock:
            return 0.0 if self._alone_since is None else time.monotonic() - self._alone_since

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class WakeClient:
    """The worker's side: wait for the node's wake-up (or a timeout), and say when a reply is pushed. Connects
    lazily and again after the node restarted; without a connection it only sleeps (polling as without it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket | None:
        with self._lock:  # the task threads say "done" while the main thread waits
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self.path))
                except OSError:
                    sock.close()
                    return None
                self._sock = sock
            return self._sock

    def connect(self) -> bool:
        """Connect now (a worker does so as it starts, before its imports: the node then knows it is alive)."""
        return self._connect() is not None

    def wait(self, seconds: float) -> bool:
        """Block until the node wakes us (True) or ``seconds`` pass (False)."""
        sock = self._connect()
        if sock is None:
            time.sleep(seconds)
            return False
        sock.settimeout(seconds)
        try:
            data = sock.recv(64)
        except TimeoutError:
            return False
        except OSError:
            data = b""
        if not data:  # the node closed the socket (it stopped): poll until it is back
            self._reset()
            time.sleep(seconds)
            return False
        return True

    def reply_pushed(self) -> None:
        """Tell the node a reply is in its Runtime API (it sends it on at once)."""
        sock = self._connect()
        if sock is None:
            return
        try:
            sock.sendall(DONE)
        except OSError:
            self._reset()

    def _reset(self) -> None:
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._reset()
