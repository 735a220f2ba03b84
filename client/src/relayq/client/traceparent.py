"""W3C Trace Context `traceparent` values: the one check the producer and ingest share.

A traceparent names the sender's trace and span (https://www.w3.org/TR/trace-context/):

    00-<trace-id: 32 hex>-<parent-id: 16 hex>-<trace-flags: 2 hex>

relayq keeps an event's traceparent and sends it on with every delivery, so the receiver's
trace joins the sender's. Only what relayq will pass on to a receiver is accepted: version 00
exactly as the specification writes it (lowercase hex, 55 characters), a trace id and a parent
id that are not all zeros. The specification lets a receiver parse versions above 00 by their
first four fields; relayq does not guess at a format it cannot check, so it refuses them, and
version ff, which is never valid. Lives in relayq-client (which the server depends on) so the
producer refuses at send() what ingest would refuse, by the same rules.
"""

from __future__ import annotations

import re
from typing import Any

_otel_context: Any
_otel_trace: Any
try:  # optional: the producer takes the current span's context when OpenTelemetry is there
    from opentelemetry import context as _otel_context
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - depends on what the application installed
    _otel_context = _otel_trace = None

# Version 00: exactly four lowercase-hex fields. fullmatch, so nothing may follow.
_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16
LENGTH = 55


def problem(value: str) -> str | None:
    """Why `value` is not a traceparent relayq keeps, or None when it is one."""
    if len(value) != LENGTH:
        if len(value) > LENGTH and value[:2] not in ("00", "ff"):
            return f"version {value[:2]!r} is not supported (only 00)"
        return f"expected {LENGTH} characters (00-<32 hex>-<16 hex>-<2 hex>), got {len(value)}"
    match = _VERSION_00.fullmatch(value)
    if match is None:
        if value[:2] == "ff":
            return "version ff is invalid"
        if value[:2] != "00" and re.fullmatch(r"[0-9a-f]{2}", value[:2]):
            return f"version {value[:2]!r} is not supported (only 00)"
        return "expected 00-<32 lowercase hex>-<16 lowercase hex>-<2 lowercase hex>"
    if match.group(1) == _ZERO_TRACE:
        return "the trace id is all zeros"
    if match.group(2) == _ZERO_PARENT:
        return "the parent id is all zeros"
    return None


def is_valid(value: str) -> bool:
    return problem(value) is None


def trace_id(value: str) -> str:
    """The trace id (32 hex) of a valid traceparent."""
    return value[3:35]


def make(trace_id: int, span_id: int, flags: int) -> str:
    """A version-00 traceparent from its parts (as OpenTelemetry's SpanContext holds them)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags & 0xFF:02x}"


def current() -> str | None:
    """The traceparent of the current OpenTelemetry span, when opentelemetry-api is installed
    and a valid span is current (the producer's default for send()); else None. An empty
    context (nothing traced here) costs one context-variable read."""
    if _otel_context is None or not _otel_context.get_current():
        return None
    span_context = _otel_trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return make(span_context.trace_id, span_context.span_id, span_context.trace_flags)
