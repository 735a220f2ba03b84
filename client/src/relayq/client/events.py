"""Turning send()'s arguments into an Ingest event, checked and serialised once.

Each event is serialised here, in the caller's thread, and kept as the bytes of one entry of
IngestRequest.events (its field tag and length included). A batch is then those byte strings
joined: no protobuf message is built or copied per batch, the batch's size in bytes is exact,
and a retry sends the very same bytes, so the same message ids.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from relayq.client import jsontext
from relayq.client import traceparent as tracecontext
from relayq.client.errors import InvalidEvent
from relayq.client.ids import MessageIds
from relayq.client.limits import MAX_MESSAGE_ID, MAX_NAME, MAX_USER_ID
from relayq.v1 import ingest_pb2

# The envelope ingest wraps around properties: {"messageId":"","timestamp":"2026-01-01T...Z",
# "receivedAt":"...","properties":}. A lower bound, so the client never refuses an event the
# server would take; events within a few bytes of the limit are left for the server to judge.
_ENVELOPE_BYTES = 90
# IngestRequest.partial_success = true (field 2, varint 1): appended to every request.
PARTIAL_SUCCESS = b"\x10\x01"
# IngestRequest.events is field 1, length-delimited.
_EVENTS_TAG = b"\x0a"


def encode(
    ids: MessageIds,
    *,
    message_id: str | None,
    user_id: str | None,
    anonymous_id: str | None,
    event: str | None,
    type: str | None,
    properties: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    timestamp: datetime | str | None,
    destination_ids: Sequence[str],
    max_event_bytes: int,
    traceparent: str | None = None,
) -> tuple[bytes, str, str]:
    """Check an event as ingest would (sizes, required fields) and serialise it; returns
    (frame, message_id, ordering key), what a lanes.Item carries.

    Raises InvalidEvent naming the field. A message id of None is made here (and, being
    ours, not checked). A traceparent of None is the current OpenTelemetry span's, if any
    (tracecontext.current); "" sends none.
    """
    if message_id is None:
        message_id = ids.new()
    else:
        _text("message_id", message_id, MAX_MESSAGE_ID, required=True)
    if user_id:
        _text("user_id", user_id, MAX_USER_ID)
    if anonymous_id:
        _text("anonymous_id", anonymous_id, MAX_USER_ID)
    key = user_id or anonymous_id
    if not key:
        raise InvalidEvent("user_id: one of user_id or anonymous_id is required")
    if type:
        _text("type", type, MAX_NAME)
    if event:
        _text("event", event, MAX_NAME)
    payload = _json_object("properties", properties) if properties is not None else "{}"
    context_json = _json_object("context", context) if context else ""
    size = (len(payload) + len(context_json) + len(message_id) + len(key) + len(type or "")
            + len(event or "") + _ENVELOPE_BYTES)
    if size > max_event_bytes:
        raise InvalidEvent(
            f"event: at least {size} bytes once stored, over the limit of {max_event_bytes}"
            " (ingest's RELAYQ_INGEST_MAX_EVENT_BYTES; the producer's max_event_bytes)")
    if destination_ids and (not isinstance(destination_ids, list | tuple) or not all(
            isinstance(d, str) and d for d in destination_ids)):
        raise InvalidEvent("destination_ids: expected a list of destination ids")
    if traceparent is None:
        traceparent = tracecontext.current()
    elif traceparent:
        if not isinstance(traceparent, str):
            raise InvalidEvent(
                f"traceparent: expected text, got {traceparent.__class__.__name__}")
        problem = tracecontext.problem(traceparent)
        if problem is not None:
            raise InvalidEvent(f"traceparent: {problem}")
    if anonymous_id or context_json or destination_ids or traceparent:
        message = ingest_pb2.Event(
            message_id=message_id, user_id=user_id or "", anonymous_id=anonymous_id or "",
            type=type or "", event=event or "", timestamp=_timestamp(timestamp),
            payload_json=payload, context_json=context_json, destination_ids=destination_ids,
            traceparent=traceparent or "")
    else:  # the usual event: fewer arguments make a measurably cheaper constructor call
        message = ingest_pb2.Event(
            message_id=message_id, user_id=key, type=type or "", event=event or "",
            timestamp=_timestamp(timestamp), payload_json=payload)
    data = message.SerializeToString()
    return _EVENTS_TAG + _varint(len(data)) + data, message_id, key


def _text(name: str, value: object, limit: int, *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise InvalidEvent(f"{name}: expected text, got {type(value).__name__}")
    if required and not value:
        raise InvalidEvent(f"{name}: required")
    if len(value) > limit:
        raise InvalidEvent(f"{name}: longer than {limit} characters")
    if not value.isprintable() and any(c < " " or c == "\x7f" for c in value):
        raise InvalidEvent(f"{name}: contains control characters")


def _json_object(name: str, value: object) -> str:
    # `type(...) is dict` first: the usual case, without the slower ABC check.
    if type(value) is not dict and not isinstance(value, Mapping):
        raise InvalidEvent(f"{name}: expected a JSON object (a dict), got {type(value).__name__}")
    try:
        return jsontext.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"{name}: not JSON: {exc}") from None


def _timestamp(value: datetime | str | None) -> timestamp_pb2.Timestamp:
    """When the event happened: given, or now. Set at send() time, so an event that waits in
    the buffer or through retries still carries the moment it was sent, not when it arrived."""
    if value is None:
        nanos = time.time_ns()
        return timestamp_pb2.Timestamp(seconds=nanos // 1_000_000_000,
                                       nanos=nanos % 1_000_000_000)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent(
                f"timestamp: expected ISO 8601 with a time zone, got {value!r}") from None
    if not isinstance(value, datetime):
        raise InvalidEvent(f"timestamp: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise InvalidEvent("timestamp: needs a time zone (a naive datetime is ambiguous)")
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromDatetime(value.astimezone(UTC))
    except (ValueError, OverflowError) as exc:
        raise InvalidEvent(f"timestamp: {exc}") from None
    return stamp


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
