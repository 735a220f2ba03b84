"""Checking an IngestRequest and turning its events into the documents that will be delivered.

Pure functions: no I/O, so every rule here has a unit test. Problems with the batch as a whole
raise InvalidArgument; problems with one event are collected per event, and the caller decides
(all-or-nothing unless the client asked for partial success).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format, timestamp_pb2

from ingest_service.config import Limits
from jobsdb.ingest import NewEvent
from jobsdb.write_keys import SourceRoute
from relayq.client import traceparent as tracecontext
from relayq.client.limits import MAX_MESSAGE_ID, MAX_NAME, MAX_USER_ID
from relayq.rpc import InvalidArgument
from relayq.v1 import ingest_pb2

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What google.protobuf.Timestamp can hold: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# Postgres's numeric type (which jsonb stores numbers in) takes at most this many digits
# before the decimal point and after it, and an exponent below INT_MAX / 2.
PG_MAX_DIGITS_BEFORE_POINT = 131_072
PG_MAX_DIGITS_AFTER_POINT = 16_383
_PG_MAX_EXPONENT = 2**31 // 2 - 1
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([-+]?\d+))?")
# A number orjson takes that Postgres refuses has an exponent of five digits or more (a value
# that underflows to 0.0 in a double, or a zero with a vast exponent) or a run of a thousand
# digits; anything bigger orjson refuses itself. Each pattern starts with a literal, which
# the regex engine finds at C speed: half a microsecond on a typical event. The exponent
# patterns also match inside strings (a hex id such as "9be12345..." does, in one event of
# fifteen with a random 16-digit hex id): a match counts only where a number can stand.
_LONG_EXPONENT = (re.compile(r"e[-+]?\d{5}"), re.compile(r"E[-+]?\d{5}"))
_LONG_DIGITS = re.compile(r"\d{1000}")
_MANTISSA = frozenset("0123456789.")
# What can come before a number in JSON text (a minus sign aside).
_BEFORE_VALUE = frozenset(":,[ \t\n\r")
# A \u0000 escape not itself escaped: Postgres jsonb cannot store NUL characters.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(slots=True)
class Prepared:
    # Valid events, in request order, with their index in the request.
    events: list[tuple[int, NewEvent]] = field(default_factory=list)
    # Index in the request -> why the event was rejected.
    rejected: dict[int, str] = field(default_factory=dict)


class EventRejected(Exception):
    """One event is invalid; the message says which field and why."""


def prepare(
    request: ingest_pb2.IngestRequest,
    route: SourceRoute,
    limits: Limits,
    received_at: str,
    default_traceparent: str | None = None,
) -> Prepared:
    """Validate a batch and build each valid event's document. `default_traceparent` (the
    request's metadata, already checked) is kept with the events that carry none.

    Raises InvalidArgument for the batch as a whole: empty, too many events, too many bytes,
    or a message_id repeated within it (a client bug that would otherwise be silently
    half-stored).
    """
    events = request.events
    if not events:
        raise InvalidArgument("events: the batch is empty", violations=[("events", "empty")])
    if len(events) > limits.max_batch_events:
        raise InvalidArgument(
            f"events: {len(events)} events exceed the limit of {limits.max_batch_events} per"
            " batch (RELAYQ_INGEST_MAX_BATCH_EVENTS)",
            violations=[("events", f"at most {limits.max_batch_events} events")],
        )
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidArgument(
            f"request: {size} bytes exceed the limit of {limits.max_request_bytes}"
            " (RELAYQ_INGEST_MAX_REQUEST_BYTES)",
            violations=[("request", f"at most {limits.max_request_bytes} bytes")],
        )
    prepared = Prepared()
    first_seen: dict[str, int] = {}
    for index, event in enumerate(events):
        try:
            built = build_event(event, route, limits, received_at, default_traceparent)
        except EventRejected as exc:
            prepared.rejected[index] = str(exc)
            continue
        earlier = first_seen.setdefault(built.message_id, index)
        if earlier != index:
            raise InvalidArgument(
                f"events[{index}].message_id {built.message_id!r} repeats events[{earlier}]",
                violations=[(f"events[{index}].message_id", f"repeats events[{earlier}]")],
            )
        prepared.events.append((index, built))
    return prepared


def build_event(
    event: ingest_pb2.Event, route: SourceRoute, limits: Limits, received_at: str,
    default_traceparent: str | None = None,
) -> NewEvent:
    # Each field is read once: every attribute read of a protobuf message builds a new object,
    # and this runs for every event.
    message_id = event.message_id
    user_id = event.user_id
    anonymous_id = event.anonymous_id
    kind = event.type
    name = event.event
    if not message_id:
        raise EventRejected("message_id: required")
    _check_text("message_id", message_id, MAX_MESSAGE_ID)
    if user_id:
        _check_text("user_id", user_id, MAX_USER_ID)
    if anonymous_id:
        _check_text("anonymous_id", anonymous_id, MAX_USER_ID)
    if not (user_id or anonymous_id):
        raise EventRejected("user_id: one of user_id or anonymous_id is required")
    if kind:
        _check_text("type", kind, MAX_NAME)
    if len(name) > MAX_NAME:
        raise EventRejected(f"event: longer than {MAX_NAME} characters")
    traceparent = event.traceparent
    if traceparent:
        problem = tracecontext.problem(traceparent)
        if problem is not None:
            raise EventRejected(f"traceparent: {problem}")

    properties, _ = _properties(event, limits)
    context = event.context_json
    context_text, _ = (_object_text("context_json", context, limits) if context
                                  else ("", {}))
    envelope: dict[str, Any] = {"messageId": message_id}
    if kind:
        envelope["type"] = kind
    if name:
        envelope["event"] = name
    if user_id:
        envelope["userId"] = user_id
    if anonymous_id:
        envelope["anonymousId"] = anonymous_id
    envelope["timestamp"] = (
        _timestamp(event.timestamp) if event.HasField("timestamp") else received_at
    )
    envelope["receivedAt"] = received_at
    # The client's JSON text goes in as sent (Postgres's jsonb parses it exactly, big numbers
    # included), spliced after the envelope rather than parsed and serialised again.
    text = orjson.dumps(envelope).decode()[:-1] + ',"properties":' + properties
    if context:
        text += ',"context":' + context_text
    text += "}"
    size = len(text) if text.isascii() else len(text.encode())
    if size > limits.max_event_bytes:
        raise EventRejected(
            f"event: {size} bytes exceed the limit of {limits.max_event_bytes}"
            " (RELAYQ_INGEST_MAX_EVENT_BYTES)"
        )
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise EventRejected("payload: contains a \\u0000 character, which cannot be stored")

    return NewEvent(
        source_key=route.source_key,
        tenant_key=route.tenant_key,
        message_id=message_id,
        user_id=user_id or anonymous_id,
        document=text,
        destinations=_destinations(event, route),
        traceparent=traceparent or default_traceparent,
    )


def _check_text(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise EventRejected(f"{name}: longer than {limit} characters")
    # isprintable() is a fast C check that passes almost every real id; only when it fails
    # (a control character, or merely an unusual space) does the exact check run.
    if not value.isprintable() and _CONTROL.search(value):
        raise EventRejected(f"{name}: contains control characters")


def _timestamp(stamp: timestamp_pb2.Timestamp) -> str:
    seconds, nanos = stamp.seconds, stamp.nanos
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise EventRejected(
            f"timestamp: seconds {seconds} is outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z"
            f" ({_MIN_SECONDS}..{_MAX_SECONDS})")
    if not 0 <= nanos <= 999_999_999:
        raise EventRejected(f"timestamp: nanos {nanos} is outside 0..999999999")
    return stamp.ToJsonString()


def _properties(event: ingest_pb2.Event, limits: Limits) -> tuple[str, dict[str, Any]]:
    """The event's JSON object as text, checked to be an object that jsonb will take, and the
    object itself (connection filters read it)."""
    body = event.WhichOneof("body")
    if body == "properties":
        parsed = json_format.MessageToDict(event.properties)
        return orjson.dumps(parsed).decode(), parsed
    if body is None:
        return "{}", {}
    return _object_text("payload_json", event.payload_json, limits)


def _object_text(name: str, text: str, limits: Limits) -> tuple[str, dict[str, Any]]:
    """Client JSON text, checked to be an object that jsonb will take, returned as sent, and
    the object itself (connection filters read it)."""
    if len(text) > limits.max_event_bytes:
        raise EventRejected(
            f"{name}: {len(text)} characters, over the limit of {limits.max_event_bytes}"
            " bytes per event (RELAYQ_INGEST_MAX_EVENT_BYTES)"
        )
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        value = _loads_standard(name, text, exc)
    else:
        if (_long_exponent(text) or (len(text) >= 1000 and _LONG_DIGITS.search(text))):
            _loads_standard(name, text, None)
    if not isinstance(value, dict):
        raise EventRejected(f"{name}: must be a JSON object, got {type(value).__name__}")
    return text, value


def _long_exponent(text: str) -> bool:
    """Whether `text` may hold a number with an exponent of five digits or more.

    May say yes for a string that merely looks like one (the exact check follows), never no
    for such a number: its exponent marker follows mantissa digits that follow a character
    a JSON value can follow."""
    for pattern in _LONG_EXPONENT:
        # search(), not finditer(): the usual text has no match, and finditer allocates a
        # scanner (a tracked object, so it also counts toward the next garbage collection).
        match = pattern.search(text)
        while match is not None:
            marker = match.start()
            at = marker - 1
            while at >= 0 and text[at] in _MANTISSA:
                at -= 1
            if at != marker - 1:  # else no digit before the marker: a letter in a string
                if at >= 0 and text[at] == "-":
                    at -= 1
                if at < 0 or text[at] in _BEFORE_VALUE:
                    return True
            match = pattern.search(text, marker + 1)
    return False


def _loads_standard(name: str, text: str, error: orjson.JSONDecodeError | None) -> Any:
    """orjson refuses some valid JSON (numbers beyond a double's range); the standard library
    takes those, and is told to refuse NaN and Infinity, which are not JSON at all. Every
    number is checked against what Postgres can store, as written (its text, never a float).

    What orjson refused for a reason jsonb shares stays refused, with orjson's message: nesting
    past its depth limit (the standard library runs out of stack there) and a lone surrogate
    escape such as "\\ud800" (valid to the standard library, not text to Postgres)."""
    try:
        value = json.loads(text, parse_constant=_not_json, parse_int=_storable_number,
                           parse_float=_storable_number)
        json.dumps(value, ensure_ascii=False).encode()
    except _Unstorable as exc:
        raise EventRejected(f"{name}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise EventRejected(f"{name}: invalid JSON: {error or exc}") from None
    return value


def _storable_number(literal: str) -> str:
    """The literal itself, if Postgres's numeric type can hold it (jsonb's numbers are
    numeric); else _Unstorable. Postgres counts digits as written: `1.50e-16382` has 16384
    after the point, and `0e-20000` is refused although it is zero."""
    match = _NUMBER.fullmatch(literal)
    assert match is not None, literal  # the JSON parser hands over only number tokens
    integer, fraction, written_exponent = match.group(1), match.group(2) or "", match.group(3)
    exponent = 0
    if written_exponent is not None:
        if len(written_exponent.lstrip("+-0")) > 10:
            raise _unstorable(literal, "its exponent is out of range")
        exponent = int(written_exponent)
    if abs(exponent) >= _PG_MAX_EXPONENT:
        raise _unstorable(literal, "its exponent is out of range")
    if len(fraction) - exponent > PG_MAX_DIGITS_AFTER_POINT:
        raise _unstorable(literal, f"more than {PG_MAX_DIGITS_AFTER_POINT} digits after the"
                                   " decimal point")
    digits = integer + fraction
    significant = digits.lstrip("0")
    before_point = len(integer) + exponent - (len(digits) - len(significant))
    if significant and before_point > PG_MAX_DIGITS_BEFORE_POINT:
        raise _unstorable(literal, f"more than {PG_MAX_DIGITS_BEFORE_POINT} digits before the"
                                   " decimal point")
    return literal


class _Unstorable(Exception):
    """A number Postgres cannot store (not a ValueError: the JSON parser must not take it
    for a syntax error)."""


def _unstorable(literal: str, why: str) -> _Unstorable:
    shown = literal if len(literal) <= 40 else f"{literal[:20]}...{literal[-12:]}"
    return _Unstorable(f"the number {shown} is beyond what Postgres can store: {why}")


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _destinations(event: ingest_pb2.Event, route: SourceRoute) -> tuple[int, ...] | None:
    """The connected destinations the event names (None: it names none, so it is for every
    connection). Routers apply the connections' filters when they read the event."""
    named = event.destination_ids
    if not named:
        return None
    keys: list[int] = []
    for destination_id in named:
        key = route.destinations.get(destination_id)
        if key is None:
            raise EventRejected(
                f"destination_ids: {destination_id!r} is not a destination connected to"
                f" source {route.source_id!r}"
            )
        if key not in keys:
            keys.append(key)
    return tuple(keys)
