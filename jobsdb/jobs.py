"""Jobs as operators see and steer them: list, get, peek, retry, abort, stats.

Selections come as a `Selection`: a SQL condition on `jobs j` built from fixed fragments with
positional parameters (jobsdb.filters compiles operators' filters to one; `by_ids` makes one
from job ids). `scope` is None for the operator or the tenant_key of a tenant-scoped caller.
Retry and abort are compare-and-set updates, safe while routers run; see sql/jobs.sql.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from jobsdb.errors import NotFound
from jobsdb.sqlfile import query

Conn = AsyncConnection[Any]

# Channels the routers listen on (router_service.main).
JOBS_CHANNEL = "relayq_jobs"
REORDER_CHANNEL = "relayq_reorder"


@dataclass(frozen=True, slots=True)
class Selection:
    where: sql.Composable
    params: tuple[Any, ...]


EVERYTHING = Selection(sql.SQL("true"), ())


def by_ids(job_ids: list[int]) -> Selection:
    return Selection(sql.SQL("j.job_id = ANY(%s::bigint[])"), (job_ids,))


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


def _with_where(name: str, selection: Selection) -> sql.Composed:
    return sql.SQL(query("jobs.sql", name)).format(where=selection.where)


async def list_jobs(conn: Conn, selection: Selection, scope: int | None, *, after: int,
                    limit: int, include_payload: bool) -> list[JobRow]:
    params = (include_payload, after, scope, scope, *selection.params, limit)
    cur = await conn.execute(_with_where("list", selection), params)
    return [JobRow(*row) for row in await cur.fetchall()]


async def get_job(conn: Conn, job_id: int, scope: int | None) -> tuple[JobRow, list[StatusRow]]:
    cur = await conn.execute(query("jobs.sql", "get"), {"job_id": job_id, "scope": scope})
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    cur = await conn.execute(query("jobs.sql", "history"), {"job_id": job_id})
    return JobRow(*row), [StatusRow(*r) for r in await cur.fetchall()]


async def peek(conn: Conn, destination_key: int, limit: int) -> list[PeekedRow]:
    cur = await conn.execute(query("jobs.sql", "peek"),
                             {"destination_key": destination_key, "limit": limit})
    return [PeekedRow(JobRow(*row[:-1]), row[-1]) for row in await cur.fetchall()]


async def retry(conn: Conn, selection: Selection, scope: int | None, *, actor: str,
                reason: str, replay: bool = False, apply: bool = True) -> Change:
    """Retry now (with `replay`, succeeded jobs too); with `apply` false, only count. Wakes
    the routers and makes them re-read what they hold of the affected destinations (an
    aborted or replayed job coming back goes in front of newer jobs of its user)."""
    change = await _change(conn, "retry", selection,
                           (scope, scope, *selection.params, replay, apply, actor, reason))
    await _notify(conn, REORDER_CHANNEL, change.destination_keys)
    await _notify(conn, JOBS_CHANNEL, change.destination_keys)
    return change


async def abort(conn: Conn, selection: Selection, scope: int | None, *, actor: str,
                reason: str, apply: bool = True) -> Change:
    """Abort (with `apply` false, only count), then release what waited behind the aborted
    jobs (a separate statement on purpose: see `abort` in sql/jobs.sql), and wake the
    routers."""
    change = await _change(conn, "abort", selection,
                           (scope, scope, *selection.params, apply, actor, reason))
    if change.job_ids:
        await conn.execute(query("queue.sql", "release"), {"job_ids": change.job_ids})
    await _notify(conn, JOBS_CHANNEL, change.destination_keys)
    return change


async def _change(conn: Conn, name: LiteralString, selection: Selection,
                  params: tuple[Any, ...]) -> Change:
    cur = await conn.execute(_with_where(name, selection), params)
    row = await cur.fetchone()
    assert row is not None
    return Change(matched=int(row[0]), job_ids=row[1], destination_keys=row[2])


async def _notify(conn: Conn, channel: str, destination_keys: str) -> None:
    if destination_keys:
        # A payload must stay under 8000 bytes; '*' tells the routers to look everywhere.
        payload = destination_keys if len(destination_keys) < 7000 else "*"
        await conn.execute(query("jobs.sql", "notify"),
                           {"channel": channel, "destinations": payload})


async def stats(conn: Conn, *, tenant_key: int | None, destination_key: int | None
                ) -> list[DestinationStatsRow]:
    cur = await conn.execute(query("jobs.sql", "stats"),
                             {"tenant_key": tenant_key, "destination_key": destination_key})
    return [DestinationStatsRow(*row) for row in await cur.fetchall()]


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
