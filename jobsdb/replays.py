"""Replays and backfills: an operator's request to send a source's logged events to one
destination (again), made into job rows a chunk at a time.

Why rows: a replay is an operator's action, the one thing besides failures that the event
log keeps rows for (docs/design.md, "Replays and backfills"). As rows, replayed jobs go through
the row path the routers already run for retries: job order per user, the barrier behind an
earlier unfinished job of the same user, retries with their history, GetJob, AbortJobs. The
worker (router_service/replays.py) writes a chunk per transaction and records how far it
went in the same transaction, so a crash repeats nothing and skips nothing.

Two rules keep a replay from racing the live read of the same destination:
- a replay writes rows only for events the destination's place in the log has passed (its
  cursor, or its partition's frontier): everything there is decided, so a row never doubles
  a delivery the router is making from the log; the worker waits for the rest;
- a backfill writes rows for events up to the id its connection was made at (the log's
  horizon then: everything below is committed); the destination reads the log on its own
  from there (its cursors are put there), and takes nothing from the log until the rows are
  written (routers hold it), so each user's backfilled events go before their live ones.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, LiteralString

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row, dict_row

from filterlang.events import EVENTS
from filterlang.parser import parse
from jobsdb import eventlog, jobs
from jobsdb.errors import NotFound
from jobsdb.filters import Params
from jobsdb.sqlfile import query
from jobsdb.subscriptions import job_filter

Conn = AsyncConnection[Any]

# An event's created_at is its ingest transaction's start; its id is drawn a moment later.
# Making a time into an id range allows for that disorder, this much at most (the exact
# times are then compared per event).
TIME_MARGIN = timedelta(minutes=10)
# Events read per chunk, each chunk one transaction of the worker.
CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Range:
    """Events of the source with ids in (after, last] and, when given, created in
    [from_time, to_time)."""

    after: int
    last: int
    from_time: datetime | None = None
    to_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ConnectionState:
    slot: int
    enabled: bool
    event_filter: str | None
    backfill_after: int | None


@dataclass(frozen=True, slots=True)
class Replay:
    """A replay as operators see it."""

    replay_id: str
    kind: str
    tenant_id: str
    source_id: str
    destination_id: str
    after_event_id: int
    last_event_id: int
    from_time: datetime | None
    to_time: datetime | None
    filter: str
    state: str
    matched: int
    written: int
    position: int
    actor: str
    reason: str
    created_at: datetime
    finished_at: datetime | None
    cancelled_by: str
    # Its rows not delivered yet (pending, failed, waiting), and given up on.
    unfinished: int
    aborted: int


def new_id(kind: str) -> str:
    return f"{'rpl' if kind == 'replay' else 'bkf'}-{secrets.token_hex(6)}"


async def connection(conn: Conn, source_key: int, destination_key: int
                     ) -> ConnectionState | None:
    cur = conn.cursor(row_factory=class_row(ConnectionState))
    await cur.execute(query("replays.sql", "connection"),
                      {"source_key": source_key, "destination_key": destination_key})
    return await cur.fetchone()


async def takes_other_sources(conn: Conn, source_key: int, destination_key: int) -> bool:
    cur = await conn.execute(query("replays.sql", "other_connections"),
                             {"source_key": source_key, "destination_key": destination_key})
    row = await cur.fetchone()
    return bool(row and row[0])


async def oldest(conn: Conn) -> tuple[int, datetime] | None:
    """The oldest retained event's id and time (None: the log is empty): where the log is
    whole from (jobsdb.eventlog.oldest_retained: a partition kept by an unfinished job below
    a dropped one, or a compacted one, is not counted)."""
    return await eventlog.oldest_retained(conn)


async def newest(conn: Conn) -> int:
    """The newest settled id: every event at or below it is committed or rolled back."""
    cur = await conn.execute(query("replays.sql", "newest"))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def first_id_at(conn: Conn, when: datetime, *, low: int, high: int) -> int:
    """The smallest id in [low, high + 1] whose next event was created at or after `when`
    (high + 1: none was). A binary search by the primary key, each step one index probe;
    the log is in id order and almost in time order (see TIME_MARGIN)."""
    lo, hi = low, high + 1
    while lo < hi:
        mid = (lo + hi) // 2
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(query("replays.sql", "created_at_or_after"), {"event_id": mid})
        row = await cur.fetchone()
        if row is None or row["created_at"] >= when:
            hi = mid
        else:
            lo = int(row["event_id"]) + 1
    return lo


async def id_range(conn: Conn, *, oldest_id: int, newest_id: int,
                   from_time: datetime | None, to_time: datetime | None,
                   from_event: int | None, to_event: int | None) -> Range:
    """The ids a replay reads: the ids given, narrowed by the times given (with the margin;
    the times themselves are compared per event)."""
    after = max(oldest_id - 1, (from_event - 1) if from_event else 0)
    last = min(newest_id, to_event) if to_event else newest_id
    if from_time is not None:
        after = max(after, await first_id_at(
            conn, from_time - TIME_MARGIN, low=oldest_id, high=newest_id) - 1)
    if to_time is not None:
        last = min(last, await first_id_at(
            conn, to_time + TIME_MARGIN, low=oldest_id, high=newest_id) - 1)
    return Range(after, last, from_time, to_time)


def _with_filters(statement: LiteralString, filters: Sequence[str | None],
                  params: Params) -> sql.Composed:
    """A statement with the filters' conditions over the event document (`j.payload`, as
    jobsdb.subscriptions makes connection filters into job filters) in its {where}, their
    values added to `params` (named r0, r1, ...). Only filters that compile reach here (the
    admin service checks them), and one unknown for an event (a missing field) does not take
    it."""
    parts: list[sql.Composable] = []
    for text in filters:
        if text:
            parts.append(sql.SQL("coalesce({}, false)").format(
                job_filter(parse(text, EVENTS), params)))
    where = sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")
    return sql.SQL(statement).format(where=where)


@dataclass(frozen=True, slots=True)
class Chunk:
    written: int
    # Where the replay stands now, and whether it reached its end.
    position: int
    done: bool
    # Stopped at an event the destination has not passed yet (a replay waits for it).
    waiting: bool


async def count(conn: Conn, *, source_key: int, destination_key: int, range_: Range,
                filters: Sequence[str | None]) -> int:
    """The events a replay of this range and these filters would write rows for (a dry
    run's answer): of the source, naming the destination or none."""
    where_params = Params("r")
    statement = _with_filters(_COUNT, filters, where_params)
    cur = await conn.execute(statement, {
        **where_params.values, "after": range_.after, "last": range_.last,
        "source_key": source_key, "destination_key": destination_key,
        "from_time": range_.from_time, "to_time": range_.to_time})
    row = await cur.fetchone()
    return int(row[0]) if row else 0


_COUNT: LiteralString = """
SELECT count(*)
FROM (SELECT e.document::jsonb AS payload
      FROM events e
      WHERE e.event_id > %(after)s AND e.event_id <= %(last)s
        AND e.source_key = %(source_key)s
        AND (e.destinations IS NULL OR %(destination_key)s = ANY(e.destinations))
        AND (%(from_time)s::timestamptz IS NULL OR e.created_at >= %(from_time)s)
        AND (%(to_time)s::timestamptz IS NULL OR e.created_at < %(to_time)s)) j
WHERE {where}
"""

# One chunk: the next events of the source after the replay's position; for a replay, only
# up to the first one the destination has not passed (clamp); of those, the ones in the
# time range, naming the destination or none, matching the filters, become rows: new ones
# pending, ones that ended (delivered, aborted) pending again, unfinished ones left as they
# are (they are to be delivered anyway). Each row written gets a status saying who and why.
_CHUNK: LiteralString = """
WITH taken AS (
    SELECT e.event_id, e.tenant_key, e.ordering_partition, e.created_at, e.user_id,
           e.message_id, e.destinations, e.document
    FROM events e
    WHERE e.event_id > %(position)s AND e.event_id <= %(last)s
      AND e.source_key = %(source_key)s
    ORDER BY e.event_id
    LIMIT %(chunk)s
),
placed AS (
    SELECT t.*, coalesce(dc.position, l.frontier, 0) AS passed
    FROM taken t
    LEFT JOIN router_leases l ON l.partition = t.ordering_partition
    LEFT JOIN destination_cursors dc ON dc.destination_key = %(destination_key)s
                                    AND dc.partition = t.ordering_partition
),
stop AS (
    SELECT min(event_id) AS at FROM placed WHERE %(clamp)s AND event_id > passed
),
chosen AS (
    SELECT * FROM placed
    WHERE event_id < coalesce((SELECT at FROM stop), 9223372036854775807)
),
j AS (
    SELECT c.*, c.document::jsonb AS payload
    FROM chosen c
    WHERE (c.destinations IS NULL OR %(destination_key)s = ANY(c.destinations))
      AND (%(from_time)s::timestamptz IS NULL OR c.created_at >= %(from_time)s)
      AND (%(to_time)s::timestamptz IS NULL OR c.created_at < %(to_time)s)
),
matching AS (
    SELECT * FROM j WHERE {where}
),
written AS (
    INSERT INTO jobs AS r (job_id, destination_key, tenant_key, source_key, ordering_partition,
                           state, attempts, created_at, user_id, message_id, replay_id)
    SELECT (m.event_id << 16) | %(slot)s, %(destination_key)s, m.tenant_key, %(source_key)s,
           m.ordering_partition, 'pending', %(attempts)s, m.created_at, m.user_id,
           m.message_id, %(replay_id)s
    FROM matching m
    ORDER BY m.event_id
    ON CONFLICT (job_id) DO UPDATE
    SET state = 'pending', retry_at = NULL, blocked_by = NULL, updated_at = now(),
        replay_id = excluded.replay_id
    WHERE r.state IN ('succeeded', 'aborted')
    RETURNING r.job_id, r.attempts
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, started_at, actor, reason)
    SELECT job_id, attempts, 'pending', now(), %(actor)s, %(reason)s
    FROM written
)
SELECT (SELECT count(*) FROM written) AS written,
       (SELECT at FROM stop) AS stopped_at,
       (SELECT count(*) FROM taken) AS taken,
       (SELECT max(event_id) FROM taken) AS last_taken
"""


async def write_chunk(conn: Conn, replay: dict[str, Any], *, chunk: int = CHUNK) -> Chunk:
    """Write the next chunk of a running replay's rows (the caller holds the replay locked,
    in the same transaction) and record how far it went."""
    is_replay = replay["kind"] == "replay"
    filters = [replay["connection_filter"], replay["filter"]]
    where_params = Params("r")
    statement = _with_filters(_CHUNK, filters, where_params)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(statement, {
        **where_params.values, "position": replay["position"],
        "last": replay["last_event_id"], "source_key": replay["source_key"], "chunk": chunk,
        "destination_key": replay["destination_key"], "clamp": is_replay,
        "from_time": replay["from_time"], "to_time": replay["to_time"],
        "slot": replay["slot"], "attempts": 1 if is_replay else 0,
        "replay_id": replay["replay_id"], "actor": replay["actor"],
        "reason": f"{replay['kind']} {replay['replay_id']}: {replay['reason']}"})
    row = await cur.fetchone()
    assert row is not None
    written, stopped_at = int(row["written"]), row["stopped_at"]
    taken, last_taken = int(row["taken"]), row["last_taken"]
    if stopped_at is not None:
        position, done = int(stopped_at) - 1, False
    elif taken >= chunk:
        position, done = int(last_taken), False
    else:
        position, done = int(replay["last_event_id"]), True
    await conn.execute(query("replays.sql", "advance"), {
        "replay_id": replay["replay_id"], "position": position, "written": written})
    if done:
        await conn.execute(query("replays.sql", "finish"), {"replay_id": replay["replay_id"]})
    return Chunk(written, position, done, stopped_at is not None)


async def next_running(conn: Conn, *, skip: Sequence[str] = ()) -> dict[str, Any] | None:
    """A running replay no other worker holds (nor one of `skip`), locked for this
    transaction, with its connection's slot and filter."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("replays.sql", "running"), {"skip": list(skip)})
    return await cur.fetchone()


async def create(conn: Conn, *, kind: str, tenant_key: int, source_key: int,
                 destination_key: int, range_: Range, filter_: str | None, matched: int,
                 actor: str, reason: str) -> str:
    replay_id = new_id(kind)
    await conn.execute(query("replays.sql", "create"), {
        "replay_id": replay_id, "kind": kind, "tenant_key": tenant_key,
        "source_key": source_key, "destination_key": destination_key, "after": range_.after,
        "last": range_.last, "from_time": range_.from_time, "to_time": range_.to_time,
        "filter": filter_ or None, "matched": matched, "actor": actor, "reason": reason})
    return replay_id


async def start_backfill(conn: Conn, *, source_key: int, destination_key: int,
                         after: int) -> None:
    """The connection takes from the log only events after `after`, and its destination
    reads the log on its own from there (its cursors), in the connection's transaction."""
    params = {"source_key": source_key, "destination_key": destination_key,
              "after": after, "position": after}
    await conn.execute(query("replays.sql", "backfill_connection"), params)
    await conn.execute(query("replays.sql", "cursors_at"), params)


async def rows(conn: Conn, *, scope: int | None, replay_id: str | None = None,
               destination_key: int | None = None, state: str | None = None,
               before: tuple[datetime, str] | None = None, limit: int = 100) -> list[Replay]:
    cur = conn.cursor(row_factory=class_row(Replay))
    await cur.execute(query("replays.sql", "rows"), {
        "scope": scope, "replay_id": replay_id, "destination_key": destination_key,
        "state": state, "before": before[0] if before else None,
        "before_id": before[1] if before else None, "limit": limit})
    return await cur.fetchall()


async def get(conn: Conn, replay_id: str, *, scope: int | None) -> Replay:
    found = await rows(conn, scope=scope, replay_id=replay_id, limit=1)
    if not found:
        raise NotFound(f"replay {replay_id!r} not found")
    return found[0]


async def cancel(conn: Conn, replay_id: str, *, scope: int | None, actor: str) -> Replay:
    """Stop writing rows and give up on the ones written and not delivered yet."""
    replay = await get(conn, replay_id, scope=scope)
    if replay.state != "running" and replay.unfinished == 0:
        return replay
    await conn.execute(query("replays.sql", "cancel"), {"replay_id": replay_id, "actor": actor})
    # After the UPDATE, which waited for a chunk being written: its rows are seen too.
    cur = await conn.execute(query("replays.sql", "unfinished"), {"replay_id": replay_id})
    unfinished = [int(r[0]) for r in await cur.fetchall()]
    if unfinished:
        await jobs.abort(conn, jobs.by_ids(unfinished), scope, actor=actor,
                         reason=f"{replay.kind} {replay_id} cancelled")
    return await get(conn, replay_id, scope=scope)
