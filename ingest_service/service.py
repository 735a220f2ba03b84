"""The relayq.v1.Ingest servicer: authenticate, validate, hand to group commit, answer."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import grpc

from ingest_service import metrics, validate
from ingest_service.committer import EventsRefused, GroupCommitter
from ingest_service.config import Limits
from ingest_service.quota import SourceQuotas
from ingest_service.routes import RouteCache
from jobsdb.ingest import Stored
from jobsdb.write_keys import SourceRoute
from relayq.auth import bearer_token
from relayq.client import traceparent as tracecontext
from relayq.rpc import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    handle_errors,
)
from relayq.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)

Status = ingest_pb2.EventResult.Status
_ACCEPTED, _DUPLICATE, _REJECTED = Status.ACCEPTED, Status.DUPLICATE, Status.REJECTED
_UNSET = ingest_pb2.EventResult()

# How many invalid events an all-or-nothing rejection lists in its details.
_MAX_VIOLATIONS = 50


class IngestServicer(ingest_pb2_grpc.IngestServicer):
    def __init__(self, routes: RouteCache, committer: GroupCommitter, limits: Limits) -> None:
        self._routes = routes
        self._committer = committer
        self._limits = limits
        self._quotas = SourceQuotas()

    @handle_errors
    async def Ingest(
        self, request: ingest_pb2.IngestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ingest_pb2.IngestResponse:
        write_key = bearer_token(context)
        if write_key is None:
            metrics.REJECTS.labels("auth").inc()
            raise Unauthenticated(
                "missing write key: send metadata 'authorization: Bearer <write key>'"
            )
        route = await self._routes.get(write_key)
        if route is None:
            metrics.REJECTS.labels("auth").inc()
            raise Unauthenticated("unknown, revoked or expired write key")
        if not route.enabled:
            metrics.REJECTS.labels("auth").inc()
            raise PermissionDenied(f"source {route.source_id!r} is disabled")

        received_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            prepared = validate.prepare(request, route, self._limits, received_at,
                                        _metadata_traceparent(context))
        except InvalidArgument:
            metrics.REJECTS.labels("batch").inc()
            raise
        metrics.BATCH_EVENTS.observe(len(request.events))
        if prepared.rejected and not request.partial_success:
            metrics.REJECTS.labels("event").inc(len(prepared.rejected))
            raise _all_or_nothing(prepared.rejected, len(request.events))

        # Counted after validation: a refused batch must not use up the source's limit.
        wanted = len(prepared.events)
        wait = self._quotas.take(route.source_key, route.rate_per_second, route.rate_burst,
                                 wanted)
        if wait > 0:
            metrics.REJECTS.labels("rate").inc()
            raise ResourceExhausted(
                f"source {route.source_id!r} is over its rate limit of"
                f" {route.rate_per_second:g} events/s (burst {route.rate_burst}); nothing was"
                f" stored, retry in {wait:.3f}s", retry_after=wait)
        try:
            stored = await self._store(request, prepared)
        except BaseException:
            self._quotas.give_back(route.source_key, wanted)  # nothing stored: the retry may go
            raise

        response = _response(request, prepared, stored, route)
        metrics.EVENTS.labels("accepted").inc(response.accepted)
        metrics.EVENTS.labels("duplicate").inc(response.duplicates)
        metrics.EVENTS.labels("rejected").inc(response.rejected)
        return response


    async def _store(self, request: ingest_pb2.IngestRequest, prepared: validate.Prepared
                     ) -> list[Stored]:
        """Commit the valid events. Events Postgres refuses after all (validation missed
        them) are named like any invalid event: the batch is refused, or under
        partial_success they are rejected and the rest is stored."""
        if not prepared.events:
            return []
        try:
            return await self._committer.submit([e for _, e in prepared.events])
        except EventsRefused as refused:
            by_index = {prepared.events[i][0]: reason for i, reason in refused.refused.items()}
            metrics.REJECTS.labels("event").inc(len(by_index))
            if not request.partial_success:
                raise _all_or_nothing(by_index, len(request.events)) from None
            prepared.rejected.update(by_index)
            prepared.events = [e for i, e in enumerate(prepared.events)
                               if i not in refused.refused]
        if not prepared.events:
            return []
        try:
            return await self._committer.submit([e for _, e in prepared.events])
        except EventsRefused as refused:  # refused again: a fault, not bad data to single out
            raise Unavailable(f"Postgres refused events it had accepted a moment ago: {refused}"
                              "; nothing was stored, send the batch again") from None


def _metadata_traceparent(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The request's metadata `traceparent`, the default of its events that carry none. A
    malformed one is ignored and counted, not refused: it is usually set by a tracing library
    around the call, not by the application, and the events themselves are sound."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if tracecontext.is_valid(text):
                return text
            metrics.IGNORED_TRACEPARENTS.inc()
            log.info("ignored a malformed metadata traceparent: %s",
                     tracecontext.problem(text))
            return None
    return None


def _response(
    request: ingest_pb2.IngestRequest, prepared: validate.Prepared, stored: list[Stored],
    route: SourceRoute,
) -> ingest_pb2.IngestResponse:
    """One result per event in request order. Built with constructor arguments: setting fields
    one by one on protobuf messages costs twice as much, and this runs for every event."""
    # Every position is filled below: each event is either prepared or rejected.
    results = [_UNSET] * len(request.events)
    accepted = duplicates = 0
    connected = len(route.destination_keys)
    for (index, event), outcome in zip(prepared.events, stored, strict=True):
        if outcome.duplicate:
            results[index] = ingest_pb2.EventResult(
                message_id=event.message_id, status=_DUPLICATE)
            duplicates += 1
        else:
            named = event.destinations
            results[index] = ingest_pb2.EventResult(
                message_id=event.message_id, status=_ACCEPTED, event_id=outcome.event_id or 0,
                destinations=connected if named is None else len(named))
            accepted += 1
    events = request.events
    for index, reason in prepared.rejected.items():
        results[index] = ingest_pb2.EventResult(
            message_id=events[index].message_id, status=_REJECTED, reason=reason)
    return ingest_pb2.IngestResponse(
        results=results, accepted=accepted, duplicates=duplicates,
        rejected=len(prepared.rejected))


def _all_or_nothing(rejected: dict[int, str], total: int) -> InvalidArgument:
    first, reason = next(iter(rejected.items()))
    more = len(rejected) - 1
    message = f"events[{first}].{reason}"
    if more:
        message += f" (and {more} more invalid event{'s' if more > 1 else ''})"
    message += f"; nothing of the {total} events was stored (set partial_success to store" \
        " the valid ones)"
    violations = [
        (f"events[{index}].{reason.partition(':')[0]}", reason.partition(": ")[2] or reason)
        for index, reason in list(rejected.items())[:_MAX_VIOLATIONS]
    ]
    return InvalidArgument(message, violations=violations)
