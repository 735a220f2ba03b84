"""Replays and backfills: send a source's logged events to a destination (again).

The operation checks, counts (a dry run stops there) and records the replay; a router's
replay worker writes its rows a chunk at a time (jobsdb.replays says why rows, and how a
replay keeps clear of the live read).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from psycopg import AsyncConnection

from admin_service import convert, paging, validate
from admin_service.ops.base import Concern, changed, filters_exist
from jobsdb import catalog, replays
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.rpc import FailedPrecondition
from relayq.v1 import admin_pb2

Conn = AsyncConnection[Any]

_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
STATES = ("running", "done", "cancelled")
# What jobsdb.replays.new_id makes: a replay's or a backfill's id.
_REPLAY_ID = re.compile(r"(rpl|bkf)-[0-9a-f]{12}")


class Replays(Concern):
    async def replay(self, caller: Caller, request: admin_pb2.ReplayEventsRequest
                     ) -> admin_pb2.ReplayEventsResponse:
        source_id = validate.reference("source_id", request.source_id)
        destination_id = validate.reference("destination_id", request.destination_id)
        from_time = _time(request, "from_time")
        to_time = _time(request, "to_time")
        if from_time and to_time and from_time >= to_time:
            raise validate.bad("to_time", "must be after from_time")
        from_event = request.from_event_id or None
        to_event = request.to_event_id or None
        if from_event and to_event and from_event > to_event:
            raise validate.bad("to_event_id", "must not be below from_event_id")
        filter_ = validate.event_filter("filter", request.filter) or None
        reason = validate.reason(request.reason)
        if not request.dry_run and not reason.strip():
            raise validate.bad("reason", "required: say why these events are sent again")
        async with transaction(self._pool) as conn:
            source = await catalog.get_source(conn, source_id, caller.scope)
            destination = await catalog.get_destination(conn, destination_id, caller.scope)
            connection = await replays.connection(conn, source.source_key,
                                                  destination.destination_key)
            if connection is None or not connection.enabled:
                raise FailedPrecondition(
                    f"source {source.id!r} is not connected to destination {destination.id!r}:"
                    " a replay sends through the connection (connect it first)")
            range_ = await _bounds(conn, from_time=from_time, to_time=to_time,
                                   from_event=from_event, to_event=to_event,
                                   from_oldest=request.from_oldest)
            filters = [connection.event_filter, filter_]
            matched = await replays.count(conn, source_key=source.source_key,
                                          destination_key=destination.destination_key,
                                          range_=range_, filters=filters)
            if request.dry_run:
                return admin_pb2.ReplayEventsResponse(matched=matched, dry_run=True)
            replay_id = await replays.create(
                conn, kind="replay", tenant_key=source.tenant_key, source_key=source.source_key,
                destination_key=destination.destination_key, range_=range_, filter_=filter_,
                matched=matched, actor=caller.actor, reason=reason)
            row = await replays.get(conn, replay_id, scope=caller.scope)
        changed(caller, "replay started", replay=replay_id, tenant=source.tenant_id,
                source=source.id, destination=destination.id, matched=matched, reason=reason)
        return admin_pb2.ReplayEventsResponse(matched=matched, replay=convert.replay(row))

    async def list(self, caller: Caller, request: admin_pb2.ListReplaysRequest
                   ) -> admin_pb2.ListReplaysResponse:
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        destination_id = validate.optional_reference("destination_id", request.destination_id)
        if request.state and request.state not in STATES:
            raise validate.bad("state", f"one of {', '.join(STATES)}; got {request.state!r}")
        caller.check_tenant_filter(request.tenant_id)
        page = paging.read("replays", request.page_size, request.page_token)
        before = _page_key(page.after)
        async with transaction(self._pool) as conn:
            await filters_exist(conn, caller, tenant_id=tenant_id, destination_id=destination_id)
            scope = caller.scope
            if tenant_id is not None:
                scope = (await catalog.get_tenant(conn, tenant_id, caller.scope)).tenant_key
            destination_key = None
            if destination_id is not None:
                destination_key = (await catalog.get_destination(
                    conn, destination_id, caller.scope)).destination_key
            rows = await replays.rows(conn, scope=scope, destination_key=destination_key,
                                      state=request.state or None, before=before,
                                      limit=page.limit)
        return admin_pb2.ListReplaysResponse(
            replays=[convert.replay(r) for r in rows],
            next_page_token=page.next_token(
                rows, lambda r: f"{r.created_at.isoformat()}|{r.replay_id}"))

    async def get(self, caller: Caller, request: admin_pb2.GetReplayRequest
                  ) -> admin_pb2.Replay:
        replay_id = _replay_id(request.replay_id)
        async with transaction(self._pool) as conn:
            return convert.replay(await replays.get(conn, replay_id, scope=caller.scope))

    async def cancel(self, caller: Caller, request: admin_pb2.CancelReplayRequest
                     ) -> admin_pb2.Replay:
        replay_id = _replay_id(request.replay_id)
        async with transaction(self._pool) as conn:
            row = await replays.cancel(conn, replay_id, scope=caller.scope, actor=caller.actor)
        changed(caller, "replay cancelled", replay=replay_id)
        return convert.replay(row)


async def check_backfill(conn: Conn, source: catalog.Source,
                         destination: catalog.Destination) -> None:
    """In ConnectSource's transaction, before it connects: may a backfill start there?"""
    connection = await replays.connection(conn, source.source_key, destination.destination_key)
    if connection is not None and connection.enabled:
        raise FailedPrecondition(
            f"source {source.id!r} is already connected to destination {destination.id!r}:"
            " a backfill is for a new connection (send past events with ReplayEvents)")
    if await replays.takes_other_sources(conn, source.source_key, destination.destination_key):
        raise FailedPrecondition(
            f"destination {destination.id!r} takes events of another source: a backfill needs"
            " a destination of its own (connect the other sources after it)")


async def start_backfill(conn: Conn, caller: Caller, source: catalog.Source,
                         destination: catalog.Destination, when: datetime | None,
                         backfill_from: str) -> str:
    """In ConnectSource's transaction, once it connected (check_backfill first): the
    connection takes the log from here on, and a backfill writes the rows before (from
    `when`; None: the oldest retained event). Returns the backfill's id."""
    connection = await replays.connection(conn, source.source_key, destination.destination_key)
    assert connection is not None
    range_ = await _bounds(conn, from_time=when, to_time=None, from_event=None, to_event=None,
                           from_oldest=when is None)
    await replays.start_backfill(conn, source_key=source.source_key,
                                 destination_key=destination.destination_key,
                                 after=range_.last)
    matched = await replays.count(conn, source_key=source.source_key,
                                  destination_key=destination.destination_key, range_=range_,
                                  filters=[connection.event_filter])
    return await replays.create(
        conn, kind="backfill", tenant_key=source.tenant_key, source_key=source.source_key,
        destination_key=destination.destination_key, range_=range_, filter_=None,
        matched=matched, actor=caller.actor, reason=f"backfill from {backfill_from}")


def parse_backfill_from(value: str) -> datetime | None:
    """"earliest" (None), an RFC 3339 time, or a duration before now ("7d")."""
    text = value.strip()
    if text == "earliest":
        return None
    if match := _DURATION.match(text):
        return datetime.now(UTC) - timedelta(
            seconds=int(match.group(1)) * _UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise validate.bad("backfill_from", "'earliest', an RFC 3339 time "
                           "(2026-12-01T00:00:00Z) or a duration such as 7d, 12h, 30m; "
                           f"got {value!r}") from None
    if when.tzinfo is None:
        raise validate.bad("backfill_from", f"a time needs its offset (Z or +01:00); got {value!r}")
    return when


async def _bounds(conn: Conn, *, from_time: datetime | None, to_time: datetime | None,
                  from_event: int | None, to_event: int | None,
                  from_oldest: bool) -> replays.Range:
    """The ids the range covers in the log as it is now, refusing one that reaches before
    the oldest retained event unless asked to start from it."""
    oldest = await replays.oldest(conn)
    newest = await replays.newest(conn)
    if oldest is None:
        return replays.Range(newest, newest, from_time, to_time)
    oldest_id, oldest_time = oldest
    if not from_oldest:
        if from_time is not None and from_time < oldest_time:
            raise FailedPrecondition(
                f"the oldest event retained is from {oldest_time.isoformat()} (event"
                f" {oldest_id}); the log no longer has events from {from_time.isoformat()}:"
                " start from then, or ask to start from the oldest")
        if from_event is not None and from_event < oldest_id:
            raise FailedPrecondition(
                f"the oldest event retained is event {oldest_id} (from"
                f" {oldest_time.isoformat()}); event {from_event} is gone: start from it, or"
                " ask to start from the oldest")
    return await replays.id_range(conn, oldest_id=oldest_id, newest_id=newest,
                                  from_time=from_time, to_time=to_time,
                                  from_event=from_event, to_event=to_event)


def _time(request: admin_pb2.ReplayEventsRequest,
          field: Literal["from_time", "to_time"]) -> datetime | None:
    if not request.HasField(field):
        return None
    value: datetime = getattr(request, field).ToDatetime(tzinfo=UTC)
    return value


def _replay_id(value: str) -> str:
    if not _REPLAY_ID.fullmatch(value):
        raise validate.bad("replay_id", f"a replay id such as rpl-0123456789ab; got {value!r}")
    return value


def _page_key(after: str) -> tuple[datetime, str] | None:
    if not after:
        return None
    stamp, _, replay_id = after.rpartition("|")
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        when = None
    if when is None or not _REPLAY_ID.fullmatch(replay_id):
        raise validate.bad("page_token", "not a page token from this API")
    return when, replay_id
