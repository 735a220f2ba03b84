"""Jobs as operators see and steer them: list, get, peek, retry, abort, stats.

A job is an (event, destination) pair, and most have no row: sql/jobs.sql `view` derives every
job's state from the rows there are and the cursors. Selections come as a `Selection`: a SQL
condition on the job `j` built from fixed fragments with named parameters (jobsdb.filters
compiles operators' filters to one; `by_ids` makes one from job ids), with the states it can
match, so a selection of failed or waiting jobs reads only rows. `scope` is None for the
operator or the tenant_key of a tenant-scoped caller. Retry and abort are compare-and-set
updates (and inserts, for jobs without a row), safe while routers run; see sql/jobs.sql.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, LiteralString

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row, kwargs_row

from jobsdb import subscriptions
from jobsdb.filters import Params
from jobsdb.keyspace import SLOT_BITS, event_of
from jobsdb.sqlfile import query

Conn = AsyncConnection[Any]

# Channels the routers listen on (router_service.main).
JOBS_CHANNEL = "relayq_jobs"
REORDER_CHANNEL = "relayq_reorder"

# A listing reads the log in windows of event ids, the first small (a page of a busy
# destination fills in it), each next one twice as large up to a cap, and at most so many
# event ids for one page (then it answers what it found, with a token to go on from there).
_FIRST_WINDOW = 1_000
_LARGEST_WINDOW = 64_000
_MOST_PER_PAGE = 500_000


@dataclass(frozen=True, slots=True)
class Selection:
    where: sql.Composable
    # Its parameters by name (jobsdb.filters.Params names them f0, f1, ...).
    params: Mapping[str, Any]
    # The states it can match (a filter on state narrows them).
    states: frozenset[str] = subscriptions.STATES
    # Only these jobs (by_ids).
    job_ids: tuple[int, ...] | None = None


EVERYTHING = Selection(sql.SQL("true"), {})


def by_ids(job_ids: list[int]) -> Selection:
    return Selection(sql.SQL("j.job_id = ANY(%(selected_ids)s::bigint[])"),
                     {"selected_ids": job_ids}, job_ids=tuple(job_ids))


@dataclass(frozen=True, slots=True)
class JobRow:
    job_id: int
    tenant_id: str
    source_id: str
    destination_id: str
    user_id: str
    message_id: str
    state: str
    attempts: int
    retry_at: datetime | None
    blocked_by: int | None
    error_code: str | None
    created_at: datetime
    updated_at: datetime
    first_attempt_at: datetime | None
    payload: str | None
    # The event's W3C traceparent (None: sent without one).
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class StatusRow:
    attempt: int
    state: str
    error_code: str | None
    response: str | None
    started_at: datetime
    duration_ms: int | None
    retry_at: datetime | None
    actor: str
    reason: str | None
    # The webhook-id of the batch request that carried this attempt (None: not batched).
    batch: str | None


@dataclass(frozen=True, slots=True)
class PeekedRow:
    job: JobRow
    # The job holding this one, or None.
    holder: int | None


@dataclass(frozen=True, slots=True)
class DestinationStatsRow:
    destination_key: int
    destination_id: str
    tenant_id: str
    paused: bool
    pending: int
    failed: int
    waiting: int
    succeeded: int
    aborted: int
    oldest_pending_seconds: float | None
    recent_succeeded: int
    recent_failed: int
    # Set while the destination's circuit is open.
    circuit_opened_at: datetime | None
    circuit_reason: str | None


@dataclass(frozen=True, slots=True)
class ConnectionStatsRow:
    source_id: str
    destination_id: str
    destination_key: int
    tenant_id: str
    filter: str
    filtered_out: int
    recent_filtered_out: int


@dataclass(frozen=True, slots=True)
class Change:
    """What a retry or abort matched, what it changed, and of which destinations."""

    matched: int
    job_ids: list[int]
    destination_keys: str  # comma-separated, the routers' notification format

    @property
    def changed(self) -> int:
        return len(self.job_ids)


@dataclass(slots=True)
class _View:
    """The job view (sql/jobs.sql `view`) for one query, and its parameters."""

    composed: sql.Composable
    params: dict[str, Any] = field(default_factory=dict)


async def _view(conn: Conn, selection: Selection, *, after_job: int = 0,
                upto_event: int | None = None) -> _View:
    """The view narrowed to what `selection` can match: rows only when it wants no pending
    or succeeded job; by ids, the log only at their events; else, with `upto_event`, the log
    only in (after_job's event, upto_event)."""
    params: dict[str, Any] = {}
    if selection.job_ids is not None:
        rows = sql.SQL("r.job_id = ANY(%(view_job_ids)s::bigint[])")
        params["view_job_ids"] = list(selection.job_ids)
    elif upto_event is not None:
        rows = sql.SQL("r.job_id > %(view_after_job)s AND r.job_id < %(view_before_job)s")
        params.update(view_after_job=after_job, view_before_job=upto_event << SLOT_BITS)
    else:
        rows = sql.SQL("true")
    if not selection.states & subscriptions.LOG_STATES:
        log = sql.SQL("false")
    elif selection.job_ids is not None:
        log = sql.SQL("e.event_id = ANY(%(view_event_ids)s::bigint[])")
        params["view_event_ids"] = sorted({event_of(j) for j in selection.job_ids})
    elif upto_event is not None:
        log = sql.SQL("e.event_id >= %(view_from_event)s AND e.event_id < %(view_upto_event)s")
        params.update(view_from_event=event_of(after_job), view_upto_event=upto_event)
    else:
        log = sql.SQL("true")
    subscribed = Params("c")
    condition = subscriptions.condition(await subscriptions.filtered(conn), subscribed)
    composed = sql.SQL(query("jobs.sql", "view")).format(rows=rows, log=log,
                                                         subscribed=condition)
    return _View(composed, {**params, **subscribed.values})


def with_job_columns(name: LiteralString, **slots: sql.Composable) -> sql.Composed:
    """A query of sql/jobs.sql with its slots filled, {job_columns} among them."""
    return sql.SQL(query("jobs.sql", name)).format(
        job_columns=sql.SQL(query("jobs.sql", "job_columns")), **slots)


@dataclass(frozen=True, slots=True)
class JobPage:
    rows: list[JobRow]
    # Where the next page goes on from (after this job id); None: there is no more.
    more_after: int | None


async def list_jobs(conn: Conn, selection: Selection, scope: int | None, *, after: int,
                    limit: int, include_payload: bool) -> JobPage:
    """Jobs after job id `after`, in job order. Jobs that have rows come from their index;
    the log is read in windows of event ids, as many as it takes to fill the page, up to a
    bound: a page may then hold fewer than `limit`, and the next goes on from where it
    stopped."""
    rows_only = not selection.states & subscriptions.LOG_STATES
    if rows_only or selection.job_ids is not None:
        rows = await _list_window(conn, selection, scope, after=after, upto_event=None,
                                  limit=limit, include_payload=include_payload)
        return JobPage(rows, rows[-1].job_id if len(rows) == limit else None)
    cur = await conn.execute(query("jobs.sql", "log_head"))
    head = int((await cur.fetchone() or [0])[0])
    found: list[JobRow] = []
    start = first = event_of(after)
    window = _FIRST_WINDOW
    while start <= head and start - first < _MOST_PER_PAGE:
        upto = start + window
        found += await _list_window(conn, selection, scope, after=after, upto_event=upto,
                                    limit=limit - len(found), include_payload=include_payload)
        if len(found) >= limit:
            return JobPage(found, found[-1].job_id)
        after = (upto << SLOT_BITS) - 1
        start = upto
        window = min(window * 2, _LARGEST_WINDOW)
    return JobPage(found, after if start <= head else None)


async def _list_window(conn: Conn, selection: Selection, scope: int | None, *, after: int,
                       upto_event: int | None, limit: int, include_payload: bool
                       ) -> list[JobRow]:
    view = await _view(conn, selection, after_job=after, upto_event=upto_event)
    params = {**view.params, **selection.params, "include_payload": include_payload,
              "after": after, "scope": scope, "limit": limit}
    cur = conn.cursor(row_factory=class_row(JobRow))
    await cur.execute(with_job_columns("list", view=view.composed, where=selection.where), params,
                      prepare=False)
    return await cur.fetchall()


async def peek(conn: Conn, destination_key: int, limit: int) -> list[PeekedRow]:
    cur = await conn.execute(
        "SELECT array_agg(source_key) FROM connections WHERE destination_key = %s AND enabled",
        (destination_key,))
    sources = (await cur.fetchone() or [None])[0] or []
    subscribed = Params("c")
    condition = subscriptions.condition(
        [c for c in await subscriptions.filtered(conn) if c.destination_key == destination_key],
        subscribed)
    params = {"destination_key": destination_key, "sources": sources, "limit": limit,
              **subscribed.values}
    cur = conn.cursor(row_factory=kwargs_row(_peeked))
    await cur.execute(with_job_columns("peek", subscribed=condition), params, prepare=False)
    return await cur.fetchall()


def _peeked(*, holder: int | None, **job: Any) -> PeekedRow:
    return PeekedRow(JobRow(**job), holder)


async def retry(conn: Conn, selection: Selection, scope: int | None, *, actor: str,
                reason: str, replay: bool = False, apply: bool = True) -> Change:
    """Retry now (with `replay`, succeeded jobs too); with `apply` false, only count. Wakes
    the routers and makes them learn again who waits behind which row (an aborted or
    replayed job coming back goes in front of newer jobs of its user)."""
    view = await _view(conn, selection)
    change = await _change(conn, "retry", view, selection,
                           {"scope": scope, "replay": replay, "apply": apply, "actor": actor,
                            "reason": reason})
    await _notify(conn, REORDER_CHANNEL, change.destination_keys)
    await _notify(conn, JOBS_CHANNEL, change.destination_keys)
    return change


async def abort(conn: Conn, selection: Selection, scope: int | None, *, actor: str,
                reason: str, apply: bool = True) -> Change:
    """Abort (with `apply` false, only count), then release what waited behind the aborted
    jobs (a separate statement on purpose: see `abort` in sql/jobs.sql), and wake the
    routers, which learn which jobs they have not read yet are aborted."""
    view = await _view(conn, selection)
    change = await _change(conn, "abort", view, selection,
                           {"scope": scope, "apply": apply, "actor": actor, "reason": reason})
    if change.job_ids:
        await conn.execute(query("queue.sql", "release"), {"job_ids": change.job_ids})
    await _notify(conn, REORDER_CHANNEL, change.destination_keys)
    await _notify(conn, JOBS_CHANNEL, change.destination_keys)
    return change


async def _change(conn: Conn, name: LiteralString, view: _View, selection: Selection,
                  params: dict[str, Any]) -> Change:
    cur = conn.cursor(row_factory=class_row(Change))
    await cur.execute(with_job_columns(name, view=view.composed, where=selection.where),
                      {**view.params, **selection.params, **params}, prepare=False)
    row = await cur.fetchone()
    assert row is not None
    return row


async def _notify(conn: Conn, channel: str, destination_keys: str) -> None:
    if destination_keys:
        # A payload must stay under 8000 bytes; '*' tells the routers to look everywhere.
        payload = destination_keys if len(destination_keys) < 7000 else "*"
        await conn.execute(query("jobs.sql", "notify"),
                           {"channel": channel, "destinations": payload})


async def stats(conn: Conn, *, tenant_key: int | None, destination_key: int | None
                ) -> list[DestinationStatsRow]:
    subscribed = Params("c")
    condition = subscriptions.condition(await subscriptions.filtered(conn), subscribed)
    cur = conn.cursor(row_factory=class_row(DestinationStatsRow))
    # Never prepared (as every query here over the log): a generic plan cannot know which
    # of its `x IS NULL OR` conditions hold, and reads the whole log to be safe.
    await cur.execute(with_job_columns("stats", subscribed=condition),
                      {"destination_key": destination_key, "tenant_key": tenant_key,
                       **subscribed.values}, prepare=False)
    return await cur.fetchall()


async def connection_stats(conn: Conn, *, tenant_key: int | None, destination_key: int | None
                           ) -> list[ConnectionStatsRow]:
    """Connections that have a filter or whose filter kept events out, with those counts."""
    cur = conn.cursor(row_factory=class_row(ConnectionStatsRow))
    await cur.execute(query("jobs.sql", "connection_stats"),
                      {"tenant_key": tenant_key, "destination_key": destination_key})
    return await cur.fetchall()


async def fold_counts(conn: Conn) -> None:
    await conn.execute(query("jobs.sql", "fold_counts"))
    await conn.execute(query("jobs.sql", "fold_connection_counts"))
