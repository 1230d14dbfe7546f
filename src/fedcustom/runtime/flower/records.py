"""Our Message/Reply <-> Flower Message content (a RecordDict).

Settings travel in a ConfigRecord and metrics in a MetricRecord. The encoded tensors travel as one
uint8 Array in an ArrayRecord rather than as a bytes value in the ConfigRecord: Flower splits
Arrays into 5 MiB chunks on the wire, while a ConfigRecord is sent whole. Measured with Flower 1.41
through a local SuperLink, a 600 MiB payload round-tripped in 36 s as an Array and in 160 s, with
more memory in every process, as ConfigRecord bytes.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcustom.runtime.messages import Message, Reply

CONFIG, PAYLOAD, REPLY, METRICS = "fedcustom.config", "fedcustom.payload", "fedcustom.reply", "fedcustom.metrics"
ATTACHMENT = "fedcustom.attachment"  # present only when a message or reply carries one
ROUND, KIND = "fedcustom.round", "fedcustom.kind"  # reserved keys in the config record
DEFAULT_KIND = "train"  # Flower's message type for it is plain "train"; other kinds are "train.<kind>"
SETUP_DIGEST = "fedcustom.setup-digest"  # reserved config key: which client setup (sent once, with the hello) applies
SETUP_MISSING = "holds no client setup"  # what a node's error says when it lost the setup (the server resends it)


def message_type(kind: str) -> str:
    """Flower message type for one of our message kinds (Flower routes "train.<action>" to a handler)."""
    return "train" if kind == DEFAULT_KIND else f"train.{kind}"


def _payload_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord({"bytes": Array.from_numpy_ndarray(np.frombuffer(payload, dtype=np.uint8))})


def _payload(content: RecordDict, key: str = PAYLOAD) -> bytes:
    if key not in content:
        return b""
    return content[key]["bytes"].numpy().tobytes()


def _with_attachment(records: dict, attachment: bytes) -> RecordDict:
    if attachment:
        records[ATTACHMENT] = _payload_record(attachment)
    return RecordDict(records)


def bytes_record(data: bytes) -> ArrayRecord:
    """Opaque bytes as a chunkable ArrayRecord (payloads, and a client's state between messages)."""
    return _payload_record(data)


def record_bytes(record: ArrayRecord) -> bytes:
    """Inverse of :func:`bytes_record`."""
    return record["bytes"].numpy().tobytes()


def setup_digest(setup: dict[str, str]) -> str:
    """A short name for a client setup's settings: every message carries it instead of the setup itself (the
    public texts of distillation are far larger than its logits), and a node checks it against the setup it
    kept from the hello."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def message_to_content(message: Message, extra_config: dict[str, str] | None = None) -> RecordDict:
    config = ConfigRecord({**message.config, **(extra_config or {}), ROUND: message.round, KIND: message.kind})
    return _with_attachment({CONFIG: config, PAYLOAD: _payload_record(message.payload)}, message.attachment)


def content_to_message(content: RecordDict) -> Message:
    """Inverse of :func:`message_to_content`; a clear ValueError when the content is not ours."""
    if CONFIG not in content:
        raise ValueError(f"message content has no {CONFIG!r} record (records: {', '.join(content) or 'none'}); "
                         f"was it sent by a fedcustom server?")
    config = dict(content[CONFIG])
    rnd, kind = int(config.pop(ROUND)), str(config.pop(KIND))
    return Message(kind=kind, round=rnd, payload=_payload(content), config=config,
                   attachment=_payload(content, ATTACHMENT))


def reply_to_content(reply: Reply) -> RecordDict:
    status = {"num_examples": int(reply.num_examples), "error": reply.error or ""}
    if reply.round is not None:  # absent, not a sentinel, so records stay readable by older servers
        status[ROUND] = int(reply.round)
    metrics = MetricRecord({k: float(v) for k, v in reply.metrics.items()})
    return _with_attachment({REPLY: ConfigRecord(status), METRICS: metrics, PAYLOAD: _payload_record(reply.payload)},
                            reply.attachment)


def content_to_reply(content: RecordDict) -> Reply:
    """Inverse of :func:`reply_to_content`; content that is not a well-formed fedcustom reply becomes a
    Reply with an error (the server rejects it and the round goes on). A reply from a client that
    predates the round field has ``round`` None."""
    if REPLY not in content:
        return Reply(error=f"reply content has no {REPLY!r} record (records: {', '.join(content) or 'none'})")
    try:
        status = content[REPLY]
        num_examples, rnd = status["num_examples"], status.get(ROUND)
        if not _is_int(num_examples) or not (rnd is None or _is_int(rnd)):
            raise TypeError(f"num_examples and {ROUND} must be ints, got {num_examples!r} and {rnd!r}")
        metrics = dict(content[METRICS]) if METRICS in content else {}
        return Reply(payload=_payload(content), num_examples=num_examples, round=rnd,
                     attachment=_payload(content, ATTACHMENT), error=str(status["error"]) or None,
                     metrics={str(k): _metric(v) for k, v in metrics.items()})
    except (KeyError, TypeError, ValueError, EOFError, OSError, AttributeError) as exc:
        return Reply(error=f"malformed reply content: {type(exc).__name__}: {exc}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _metric(value: object) -> float:
    """A metric as a float; Flower's MetricRecord also allows lists, which our replies never send."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric values must be numbers, got {value!r}")
    return float(value)
