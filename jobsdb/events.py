"""Events of the log as operators find them: a source's events by filter, one event by id or
by message id, and where it stands at each destination of its source.

What became of an event at a destination is a job's state: it comes from
jobsdb.standing.job_status, the one place that reads it from rows, cursors and deliveries (GetJob
uses it too). This module only adds what is not a job: why an event is none at a destination
(filtered out, named elsewhere, not connected at the time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from jobsdb import jobs, standing
from jobsdb.errors import NotFound
from jobsdb.filters import Compiled
from jobsdb.sqlfile import query

Conn = AsyncConnection[Any]

# A listing reads the log in windows of event ids (as jobs.list_jobs does), at most so many
# ids for one page: a source with few events in a large log answers a short page and a
# token to go on from, rather than one query over the whole log.
_FIRST_WINDOW = 10_000
_LARGEST_WINDOW = 500_000
_MOST_PER_PAGE = 2_000_000


@dataclass(frozen=True, slots=True)
class EventRow:
    event_id: int
    tenant_id: str
    source_id: str
    source_key: int
    user_id: str
    message_id: str
    created_at: datetime
    # Destination keys the producer named (None: every connection).
    destinations: list[int] | None
    document: str | None
    # Their ids, filled in by `get` (ListEvents leaves them out).
    destination_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConnectionRow:
    destination_id: str
    destination_key: int
    slot: int
    enabled: bool
    created_at: datetime
    event_filter: str | None


@dataclass(frozen=True, slots=True)
class AtDestination:
    """Where an event stands at one destination: a job (its row and history, as GetJob
    shows it), or why it is none there (`status` filtered_out or not_connected)."""

    destination_id: str
    status: str  # pending, delivered, failed, waiting, aborted, filtered_out, not_connected
    job: jobs.JobRow | None = None
    history: list[jobs.StatusRow] = field(default_factory=list)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class EventPage:
    rows: list[EventRow]
    # Where the next page goes on from (after this event id); None: there is no more.
    more_after: int | None


async def get_by_id(conn: Conn, event_id: int, scope: int | None) -> EventRow:
    cur = conn.cursor(row_factory=class_row(EventRow))
    await cur.execute(query("events.sql", "by_id"), {"event_id": event_id, "scope": scope})
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"event {event_id} not found")
    return await _named(conn, row)


async def get_by_message(conn: Conn, source_key: int, message_id: str, scope: int | None
                         ) -> EventRow:
    """A source's event by message id: the first one (a message id sent again after the
    de-duplication window is a second event). The partitions maintenance has indexed are
    asked first, by index; only if none has it is the partition ingest writes scanned."""
    cur = await conn.execute(query("events.sql", "indexed_below"))
    below = (await cur.fetchone() or [None])[0]
    below = _ABOVE_ALL if below is None else int(below)
    for low, high in ((0, below), (below, _ABOVE_ALL)):
        if low >= high:
            continue
        rows_cur = conn.cursor(row_factory=class_row(EventRow))
        await rows_cur.execute(query("events.sql", "by_message"), {
            "source_key": source_key, "message_id": message_id, "scope": scope,
            "low": low, "high": high}, prepare=False)
        rows = await rows_cur.fetchall()
        if rows:
            return await _named(conn, min(rows, key=lambda r: r.event_id))
    raise NotFound(f"no event with message id {message_id!r} in the log of that source")


# Above every event id (they have 47 bits).
_ABOVE_ALL = 1 << 48


async def _named(conn: Conn, row: EventRow) -> EventRow:
    if not row.destinations:
        return row
    cur = await conn.execute(query("events.sql", "names"), {"keys": row.destinations})
    names = dict(await cur.fetchall())
    return dataclasses.replace(
        row, destination_ids=sorted(names.get(k, str(k)) for k in row.destinations))


async def destinations(conn: Conn, event: EventRow, scope: int | None) -> list[AtDestination]:
    """Where the event stands at every destination its source is or was connected to."""
    cur = conn.cursor(row_factory=class_row(ConnectionRow))
    await cur.execute(query("events.sql", "connections"), {"source_key": event.source_key})
    connections = await cur.fetchall()
    found = await standing.event_standing(conn, event.event_id, [c.slot for c in connections],
                                      scope)
    return [_at(event, c, found[c.slot]) for c in connections]


_STATUS = {"pending": "pending", "succeeded": "delivered", "failed": "failed",
           "waiting": "waiting", "aborted": "aborted"}


def _at(event: EventRow, connection: ConnectionRow,
        found: tuple[jobs.JobRow, list[jobs.StatusRow]] | standing.NotAJob) -> AtDestination:
    if not isinstance(found, standing.NotAJob):
        row, history = found
        return AtDestination(connection.destination_id, _STATUS[row.state], row, history)
    if found.why == "named":
        return AtDestination(connection.destination_id, "filtered_out",
                             reason="the event named other destinations")
    if connection.created_at > event.created_at:
        return AtDestination(connection.destination_id, "not_connected",
                             reason="connected after the event was sent")
    if found.why == "disabled":
        return AtDestination(connection.destination_id, "not_connected",
                             reason="the connection is disabled")
    if found.why == "filtered":
        return AtDestination(connection.destination_id, "filtered_out",
                             reason=f"the connection's filter: {connection.event_filter}")
    # Settled without a delivery: the filter of the time took it out, or the connection was
    # disabled when routers read it.
    why = (f"the connection's filter: {connection.event_filter}" if connection.event_filter
           else "the connection was disabled when it was read")
    return AtDestination(connection.destination_id,
                         "filtered_out" if connection.event_filter else "not_connected",
                         reason=why)


async def list_events(conn: Conn, source_key: int, selection: Compiled | None, *, after: int,
                      limit: int, include_payload: bool) -> EventPage:
    """A source's events after event id `after` matching the filter, in id order, read in
    windows of ids as many as it takes to fill the page, up to a bound: a page may then hold
    fewer than `limit`, and the next goes on from where it stopped."""
    cur = await conn.execute(query("jobs.sql", "log_head"))
    head = int((await cur.fetchone() or [0])[0])
    # Windows start at the first event after `after`: once retention has dropped the old
    # partitions, the log begins far above 0, and a first page must not walk up to it.
    cur = await conn.execute(query("events.sql", "first_after"), {"after": after})
    first_id = (await cur.fetchone() or [None])[0]
    if first_id is None:
        return EventPage([], None)
    after = max(after, int(first_id) - 1)
    where: sql.Composable = selection.where if selection else sql.SQL("true")
    params: Mapping[str, Any] = selection.params if selection else {}
    statement = sql.SQL(query("events.sql", "list")).format(where=where)
    found: list[EventRow] = []
    first = start = after
    window = _FIRST_WINDOW
    while start < head and start - first < _MOST_PER_PAGE:
        upto = start + window + 1
        cur2 = conn.cursor(row_factory=class_row(EventRow))
        await cur2.execute(statement, {**params, "include_payload": include_payload,
                                       "source_key": source_key, "after": start, "upto": upto,
                                       "limit": limit - len(found)}, prepare=False)
        found += await cur2.fetchall()
        if len(found) >= limit:
            return EventPage(found, found[-1].event_id)
        start = upto - 1
        window = min(window * 2, _LARGEST_WINDOW)
    return EventPage(found, start if start < head else None)
