"""Printing answers: aligned tables and key/value blocks for people, one JSON document for scripts.

People read ages ("5m ago", "in 30s") faster than timestamps, so tables show times relative
to now; the single-object views show the UTC time and the age. Scripts get the protobuf JSON
mapping (the same shape grpcurl prints), with zero counts spelled out so `jq .matched` never
meets a missing key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from relayq.v1 import common_pb2

EMPTY = "-"


def print_json(message: Message) -> None:
    document = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    print(json.dumps(document, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns separated by two spaces, padded to their widest cell; no trailing blanks."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=False)]
        print("  ".join([*cells, line[-1]]).rstrip())


def fields(pairs: Sequence[tuple[str, str]]) -> None:
    """`name   value` lines with the values aligned, for one object."""
    width = max((len(name) for name, _ in pairs), default=0)
    for name, value in pairs:
        print(f"{name.ljust(width)}  {value}".rstrip())


def when(ts: Timestamp) -> str:
    """The UTC time and its age: '2026-11-25 13:38:05 UTC (5m ago)'."""
    if not _is_set(ts):
        return EMPTY
    moment = datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({ago(ts)})"


def ago(ts: Timestamp, now: float | None = None) -> str:
    """'5m12s ago' for the past, 'in 30s' for the future, '-' when unset."""
    if not _is_set(ts):
        return EMPTY
    delta = (time.time() if now is None else now) - (ts.seconds + ts.nanos / 1e9)
    if abs(delta) < 1:
        return "now"
    return f"{span(delta)} ago" if delta > 0 else f"in {span(-delta)}"


def span(seconds: float) -> str:
    """A duration in its two largest units: 42s, 5m12s, 3h4m, 2d3h."""
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                              ("m", 60, "s", 1)):
        if total >= size:
            rest = (total % size) // smaller_size
            return f"{total // size}{unit}{rest}{smaller}" if rest else f"{total // size}{unit}"
    raise AssertionError("unreachable")


def millis(ms: int) -> str:
    """A millisecond setting as people write it: 500ms, 1s, 5m, 1.5s."""
    if ms < 1000:
        return f"{ms}ms"
    if ms % 1000:
        return f"{ms / 1000:g}s"
    return span(ms // 1000)


def state(value: int) -> str:
    """JOB_STATE_FAILED -> 'failed' (the word the filter language uses)."""
    return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def compact(value: Any, limit: int = 60) -> str:
    """One line of at most `limit` characters, for a table cell."""
    text = value if isinstance(value, str) else json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def struct_json(message: Message) -> Any:
    """A google.protobuf.Struct (a job's payload) as plain JSON values, as it was sent:
    Struct keeps every number as a double, so whole numbers come back as 3, not 3.0."""
    return _whole_numbers(json_format.MessageToDict(message))


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def pretty(value: Any) -> str:
    # Keys sorted: a Struct is a map, so the server's order is arbitrary and changes per call.
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def header_names(headers: Mapping[str, str]) -> str:
    """Webhook headers often carry the destination's credentials: show names, not values."""
    if not headers:
        return EMPTY
    return ", ".join(f"{name}: ({len(value)} chars)" for name, value in sorted(headers.items()))


def _is_set(ts: Timestamp) -> bool:
    return bool(ts.seconds or ts.nanos)


def rate(limit: common_pb2.RateLimit) -> str:
    """'50/s (burst 10)', or 'unlimited' for 0."""
    if limit.per_second <= 0:
        return "unlimited"
    return f"{limit.per_second:g}/s" + (f" (burst {limit.burst})" if limit.burst else "")
