"""Properties and context as JSON text: orjson when it is installed, the standard library
otherwise, with the same results.

send() serialises every event in the caller's thread, and orjson does it several times
faster; but this distribution depends on grpcio and protobuf only, so orjson is an extra
(relayq-client[speedups]; relayq's own distribution installs it). The standard library's
path does what orjson does: NaN and infinities become null; datetimes, dates and times are
ISO 8601 text, UUIDs their text, enums their value, dataclasses objects of their fields.
What orjson refuses that the standard library takes (integers beyond 64 bits, keys that are
not text, which become text) goes that way with either. Anything else is not JSON:
TypeError or ValueError, which send() turns into InvalidEvent.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import uuid
from datetime import date, datetime, time
from typing import Any

try:
    import orjson
except ImportError:  # the standard library's path below, same results
    orjson = None  # type: ignore[assignment]


def dumps(value: Any) -> str:
    """`value` as compact JSON text (no spaces, UTF-8 characters as they are)."""
    if orjson is not None:
        try:
            return orjson.dumps(value).decode()
        except TypeError:
            pass
    return standard_dumps(value)


def standard_dumps(value: Any) -> str:
    """The standard library's path, as orjson would write it."""
    try:
        return _ENCODER.encode(value)
    except ValueError as exc:
        # NaN or an infinity somewhere (a circular structure is the other ValueError: then
        # making the copy recurses without end, and the first error stands).
        try:
            finite = _finite(value)
        except RecursionError:
            raise exc from None
        return _ENCODER.encode(finite)


def _default(value: Any) -> Any:
    """orjson's own types, as orjson writes them."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, time):
        if value.tzinfo is not None:
            raise TypeError("datetime.time must not have tzinfo set")
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return _finite(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _finite({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """A copy with NaN and infinities as None (orjson writes them as null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                            default=_default)
