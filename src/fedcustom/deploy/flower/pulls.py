"""Shorter waits for a message's objects that have not arrived yet (Flower 1.41's object pulls).

Flower sends a message's content as separate objects (arrays in 5 MiB chunks) after the message itself: whoever
pulls the message (a SuperNode from the SuperLink, a task process from its SuperNode, the ServerApp a reply) may
ask for an object its sender has not finished pushing, is told "not available", and by Flower's defaults retries
after 1 s, then 2, 4, ... up to 10 s (``flwr.supercore.constant.PULL_INITIAL_BACKOFF`` and ``PULL_BACKOFF_CAP``,
bound as the pull functions' default arguments). A message of a few MB is pushed in a fraction of a second
here, so nearly every large message waited a whole second or more for it; split learning sends two such
messages per client and round (the client half down and up).

:func:`quicker_object_pulls` retries after ``initial`` seconds instead, doubling up to ``cap``, and bounds the wait
for one object by Flower's ``PULL_MAX_TIME`` (two hours) alone: Flower's cap of 500 tries would end sooner at
shorter waits. It changes only how long a pull waits between asks, nothing that travels, and only in the process
that calls it (our SuperNode wrapper, worker, ClientApp and ServerApp)."""

from __future__ import annotations

INITIAL_S = 0.01  # the first retry: about a 5 MiB chunk's push on a loopback
CAP_S = 0.5  # the longest wait between asks, as the SuperNode's idle poll (--max-poll)


def quicker_object_pulls(initial: float = INITIAL_S, cap: float = CAP_S) -> None:
    """Make this process's Flower object pulls retry after ``initial`` s, doubling up to ``cap`` s (idempotent)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        missing = {"initial_backoff", "backoff_cap", "max_tries_per_object"} - set(defaults or {})
        if missing:  # another Flower version: leave its pulls as they are
            return
        defaults.update(initial_backoff=initial, backoff_cap=cap, max_tries_per_object=None)
