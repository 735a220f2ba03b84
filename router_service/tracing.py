"""Trace context on deliveries: the traceparent each job sends on, and a span per attempt.

An event may come with the sender's W3C traceparent (kept in the log with it). Every sender
passes one on with each delivery of the event, so the receiver's trace joins the sender's.

Spans go through the OpenTelemetry API only (opentelemetry-api; relayq ships no SDK and no
exporter). With no SDK configured in the router (the default) the API's spans record
nothing and would send on the event's own traceparent, so none is started at all and the
event's traceparent is sent as it came: nothing is paid for tracing that nobody collects.
When the router runs with an SDK (say under `opentelemetry-instrument relayq-router`, with
an exporter installed and OTEL_* set), each attempt of a traced job gets a span of its own,
a child of the event's traceparent (kind CLIENT, PRODUCER for NATS), ended with the
attempt's outcome, and the traceparent sent on names that span: the receiver's span is then
the child of the router's delivery, itself the child of the sender's. Jobs sent without a
traceparent get no span (a root trace per delivery would only be noise).
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

from relayq.client import traceparent as tracecontext
from router_service.model import Job
from router_service.retry import Result, Verdict

# Providers that make spans which record nothing (no SDK configured).
_NO_SDK = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


class Attempt:
    """One deliver() call: the traceparent each job sends on (None: none), and the spans."""

    __slots__ = ("_spans", "traceparents")

    def __init__(self, traceparents: list[str | None], spans: list[tuple[int, Span]]) -> None:
        self.traceparents = traceparents
        self._spans = spans

    def shared(self) -> str | None:
        """The one traceparent every job of the call sends on, else None (a call's metadata
        can name only one)."""
        first = self.traceparents[0] if self.traceparents else None
        if first is None or any(t != first for t in self.traceparents):
            return None
        return first

    def finish(self, results: Sequence[Result]) -> None:
        """End the spans with each job's outcome."""
        spans, self._spans = self._spans, []
        for index, span in spans:
            result = results[index]
            span.set_attribute("relayq.outcome", result.verdict.value)
            if result.verdict is not Verdict.OK:
                span.set_attribute("error.type", result.error_code)
                span.set_status(trace.StatusCode.ERROR, result.error_code)
            span.end()

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 _: object) -> None:
        """Spans not finished (the call raised, or was cancelled at a lease's end) end as
        errors named by the exception."""
        spans, self._spans = self._spans, []
        for _index, span in spans:
            name = kind.__name__ if kind is not None else "unfinished"
            span.set_attribute("error.type", name)
            span.set_status(trace.StatusCode.ERROR, name)
            span.end()


def start(kind: str, destination_id: str, jobs: Sequence[Job]) -> Attempt:
    """The traceparents of a deliver() call's jobs, with a span per traced job when an SDK is
    configured (see the module's docstring)."""
    traceparents = [job.traceparent for job in jobs]
    provider = trace.get_tracer_provider()
    if isinstance(provider, _NO_SDK) or not any(traceparents):
        return Attempt(traceparents, [])
    # From the provider each time (a few microseconds, paid only with an SDK and a traced
    # job): a tracer kept from before an SDK was installed would not follow it.
    tracer = provider.get_tracer("relayq.router")
    spans: list[tuple[int, Span]] = []
    span_kind = SpanKind.PRODUCER if kind == "nats" else SpanKind.CLIENT
    for index, job in enumerate(jobs):
        sent = job.traceparent
        if sent is None:
            continue
        span = tracer.start_span(
            f"relayq deliver {kind}", context=trace.set_span_in_context(_remote(sent)),
            kind=span_kind, attributes={
                "relayq.destination_id": destination_id, "relayq.job_id": job.job_id,
                "relayq.message_id": job.message_id, "relayq.attempt": job.attempt})
        spans.append((index, span))
        own = span.get_span_context()
        if own.is_valid:
            traceparents[index] = tracecontext.make(own.trace_id, own.span_id,
                                                    own.trace_flags)
    return Attempt(traceparents, spans)


def _remote(value: str) -> NonRecordingSpan:
    """The sender's span, as a parent (the value was checked at ingest)."""
    return NonRecordingSpan(SpanContext(
        trace_id=int(value[3:35], 16), span_id=int(value[36:52], 16), is_remote=True,
        trace_flags=TraceFlags(int(value[53:55], 16))))
