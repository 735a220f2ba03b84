"""The event log as routers read it, and what they record when they have delivered from it.

See sql/eventlog.sql. The caller owns the transaction; every write is fenced by the caller's
leases (`owner`, a router id): by who owns them, not by whether they ran out (docs/design.md,
Fencing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from jobsdb.queue import storable, trimmed
from jobsdb.rows import check_columns
from jobsdb.sqlfile import query

Conn = AsyncConnection[Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LoggedEvent(NamedTuple):
    """One event as read from the log. A NamedTuple: a router makes one per event read."""

    event_id: int
    partition: int
    source_key: int
    tenant_key: int
    created_at: datetime
    user_id: str
    message_id: str
    # The destinations the producer named (None: every connection of the source).
    destinations: list[int] | None
    document: str
    # The sender's W3C traceparent (None: sent without one); deliveries carry it on.
    traceparent: str | None = None


# The reads' columns: a LoggedEvent's (and, for read_for, its destination first), then the
# connections' version; checked once per process against what Postgres returns.
_READ_COLUMNS = (*LoggedEvent._fields, "config_version")
_READ_FOR_COLUMNS = ("destination_key", *LoggedEvent._fields, "config_version")


class Wanted(NamedTuple):
    """A partition's share of a shared read: its events after `after`, up to `limit`."""

    partition: int
    after: int
    limit: int


class WantedFor(NamedTuple):
    """A destination's share of a partition it reads on its own: (after, upto]."""

    destination_key: int
    partition: int
    after: int
    upto: int
    limit: int
    sources: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Read:
    # Every id below it is settled (committed or rolled back): what was read is complete up
    # to the last id returned per partition, or to horizon - 1 where fewer than asked came.
    horizon: int
    events: list[LoggedEvent]
    # The connections' version in the read's snapshot (0 when nothing was read).
    config_version: int = 0


async def read(conn: Conn, wanted: Sequence[Wanted]) -> Read:
    """Events of each wanted partition in id order, below the log's horizon. Two statements
    (pipeline them, in one transaction): the horizon, then the read with a later snapshot."""
    # Both sent before either is fetched: one round trip in a pipeline.
    horizon_cur = await conn.execute(query("eventlog.sql", "set_horizon"))
    cur = await conn.execute(query("eventlog.sql", "read"), {
        "partitions": [w.partition for w in wanted],
        "afters": [w.after for w in wanted],
        "limits": [w.limit for w in wanted],
    }, binary=True)
    row = await horizon_cur.fetchone()
    assert row is not None
    rows = await cur.fetchall()
    # The hot path: tuples, their columns checked against LoggedEvent's once (jobsdb.rows).
    check_columns(cur, "eventlog.sql read", _READ_COLUMNS)
    return Read(int(row[0]), [LoggedEvent(*r[:-1]) for r in rows],
                int(rows[0][-1]) if rows else 0)


async def read_for(conn: Conn, wanted: Sequence[WantedFor]
                   ) -> tuple[dict[int, list[LoggedEvent]], int]:
    """Each destination's events in the partitions it reads on its own, by destination, and
    the connections' version in the read's snapshot (0 when nothing was read)."""
    cur = await conn.execute(query("eventlog.sql", "read_for"), {
        "destination_keys": [w.destination_key for w in wanted],
        "partitions": [w.partition for w in wanted],
        "afters": [w.after for w in wanted],
        "uptos": [w.upto for w in wanted],
        "limits": [w.limit for w in wanted],
        "sources": [";".join(map(str, w.sources)) for w in wanted],
    }, binary=True)
    found: dict[int, list[LoggedEvent]] = {w.destination_key: [] for w in wanted}
    version = 0
    check_columns(cur, "eventlog.sql read_for", _READ_FOR_COLUMNS)
    for row in await cur.fetchall():
        found[row[0]].append(LoggedEvent(*row[1:-1]))
        version = int(row[-1])
    return found, version


# --- taking partitions over ------------------------------------------------------------------

@dataclass(slots=True)
class Taken:
    """What a router needs before it reads partitions it has just taken."""

    frontiers: dict[int, int] = field(default_factory=dict)
    # (destination, partition) -> the destination's own position.
    cursors: dict[tuple[int, int], int] = field(default_factory=dict)
    # (destination, user) -> the job a user's next events there wait behind.
    blocked: dict[tuple[int, str], int] = field(default_factory=dict)
    # (destination, partition) -> events above the cursor already settled there.
    settled: dict[tuple[int, int], set[int]] = field(default_factory=dict)


async def take_over(conn: Conn, partitions: Sequence[int]) -> Taken:
    """Frontiers, destinations' own cursors, blocked users, and what is settled above the
    cursors, of partitions a router has just taken (read in one snapshot: run it in a
    REPEATABLE READ transaction)."""
    taken = Taken()
    if not partitions:
        return taken
    params = {"partitions": list(partitions)}
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("eventlog.sql", "frontiers"), params)
    taken.frontiers = {int(r["partition"]): int(r["frontier"]) for r in await cur.fetchall()}
    await cur.execute(query("eventlog.sql", "cursors"), params)
    taken.cursors = {(int(r["destination_key"]), int(r["partition"])): int(r["position"])
                     for r in await cur.fetchall()}
    taken.blocked = await blocked_users(conn, partitions)
    low = min([*taken.frontiers.values(), *taken.cursors.values()], default=0)
    await cur.execute(query("eventlog.sql", "settled_above"), {**params, "low": low})
    for r in await cur.fetchall():
        taken.settled.setdefault((int(r["destination_key"]), int(r["partition"])), set()).add(
            int(r["event_id"]))
    return taken


async def blocked_users(conn: Conn, partitions: Sequence[int], *,
                        destination_key: int | None = None) -> dict[tuple[int, str], int]:
    """(destination, user) -> root job, for users with unfinished rows in these partitions."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("eventlog.sql", "blocked_users"),
                      {"partitions": list(partitions), "destination_key": destination_key})
    return {(int(r["destination_key"]), r["user_id"]): int(r["root"])
            for r in await cur.fetchall()}


# --- recording -----------------------------------------------------------------------------

class NewRow(NamedTuple):
    """A job read from the log whose first attempt failed or was aborted: it gets a row."""

    job_id: int
    destination_key: int
    tenant_key: int
    source_key: int
    partition: int
    state: str  # 'failed' or 'aborted'
    retry_at: datetime | None
    started_at: datetime
    duration_ms: int
    created_at: datetime
    user_id: str
    message_id: str
    error_code: str | None
    response: str | None
    reason: str | None
    batch: str | None


class Parked(NamedTuple):
    """A job read from the log, to wait behind its user's unfinished rows."""

    job_id: int
    destination_key: int
    tenant_key: int
    source_key: int
    partition: int
    created_at: datetime
    user_id: str
    message_id: str


class Request(NamedTuple):
    """One request (or publish) that carried delivered jobs."""

    started_at: datetime
    duration_ms: int
    # The answer: an HTTP status, "ok" (gRPC), "ack" (NATS).
    status: str
    # The webhook-id of a batch, or "".
    batch: str


@dataclass(slots=True)
class Delivered:
    """What a flush delivered to one destination from the log: events (with their
    partitions) and, for each, the index of its request in `requests`."""

    destination_key: int
    event_ids: list[int] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    request_list: list[Request] = field(default_factory=list)


async def insert_rows(conn: Conn, rows: Sequence[NewRow], *, owner: str, actor: str
                      ) -> set[int]:
    """Rows (and first-attempt statuses) for failed and aborted jobs read from the log."""
    if not rows:
        return set()
    cur = await conn.execute(query("eventlog.sql", "insert_rows"), {
        "job_ids": [r.job_id for r in rows],
        "destination_keys": [r.destination_key for r in rows],
        "tenant_keys": [r.tenant_key for r in rows],
        "source_keys": [r.source_key for r in rows],
        "partitions": [r.partition for r in rows],
        "states": [r.state for r in rows],
        "retry_at": [r.retry_at for r in rows],
        "started_at": [r.started_at for r in rows],
        "duration_ms": [r.duration_ms for r in rows],
        "created_at": [r.created_at for r in rows],
        "user_ids": [r.user_id for r in rows],
        "message_ids": [r.message_id for r in rows],
        "error_codes": [storable(r.error_code) for r in rows],
        "responses": [storable(trimmed(r.response)) for r in rows],
        "reasons": [storable(r.reason) for r in rows],
        "batches": [r.batch for r in rows],
        "owner": owner, "actor": actor,
    }, prepare=False)
    row = await cur.fetchone()
    return set(row[0]) if row else set()


async def park(conn: Conn, parked: Sequence[Parked], *, owner: str) -> set[int]:
    """Waiting rows for jobs read from the log behind their user's root; returns those
    parked (a user with no unfinished row any more parks nothing)."""
    if not parked:
        return set()
    cur = await conn.execute(query("eventlog.sql", "park"), {
        "job_ids": [p.job_id for p in parked],
        "destination_keys": [p.destination_key for p in parked],
        "tenant_keys": [p.tenant_key for p in parked],
        "source_keys": [p.source_key for p in parked],
        "partitions": [p.partition for p in parked],
        "created_at": [p.created_at for p in parked],
        "user_ids": [p.user_id for p in parked],
        "message_ids": [p.message_id for p in parked],
        "owner": owner,
    }, prepare=False)
    return {int(r[0]) for r in await cur.fetchall()}


async def record_deliveries(conn: Conn, delivered: Iterable[Delivered], *, owner: str,
                            actor: str) -> None:
    """One deliveries row per destination of what a flush delivered (and its counts).

    Lists travel as comma-joined text, one text per destination: a flush delivers thousands
    of events, and the driver dumps a string at once but an array element by element."""
    rows = [d for d in delivered if d.event_ids]
    if not rows:
        return
    await conn.execute(query("eventlog.sql", "deliveries"), {
        "destination_keys": [d.destination_key for d in rows],
        "event_ids": [",".join(map(str, d.event_ids)) for d in rows],
        "partitions": [",".join(map(str, d.partitions)) for d in rows],
        "requests": [",".join(map(str, d.requests)) for d in rows],
        "started_at": [",".join(_epochs([r.started_at for r in d.request_list])) for d in rows],
        "duration_ms": [",".join(str(r.duration_ms) for r in d.request_list) for d in rows],
        "status": [",".join(r.status for r in d.request_list) for d in rows],
        "batch": [",".join(r.batch for r in d.request_list) for d in rows],
        "owner": owner, "actor": actor,
    }, prepare=False)


async def count_outcomes(conn: Conn, counts: dict[int, tuple[int, int]]) -> None:
    """Failed and aborted first attempts per destination, for GetStats."""
    if counts:
        await conn.execute(query("eventlog.sql", "count_outcomes"), {
            "destination_keys": list(counts),
            "failed": [f for f, _ in counts.values()],
            "aborted": [a for _, a in counts.values()],
        })


async def count_filtered(conn: Conn, counts: dict[tuple[int, int], int]) -> None:
    """Events each connection's filter kept out, per (source, destination)."""
    if counts:
        await conn.execute(query("eventlog.sql", "count_filtered"), {
            "source_keys": [s for s, _ in counts],
            "destination_keys": [d for _, d in counts],
            "filtered": list(counts.values()),
        })


async def leased(conn: Conn, *, owner: str) -> set[int]:
    """The partitions `owner` still owns (their leases run out or not: nobody took them),
    locked until commit against other routers' acquire."""
    cur = await conn.execute(query("eventlog.sql", "leased"), {"owner": owner})
    return {int(r[0]) for r in await cur.fetchall()}


async def move_frontiers(conn: Conn, frontiers: dict[int, int], *, owner: str) -> set[int]:
    """Move partitions' frontiers forward; returns the partitions moved (still owned)."""
    if not frontiers:
        return set()
    cur = await conn.execute(query("eventlog.sql", "move_frontiers"), {
        "partitions": list(frontiers), "frontiers": list(frontiers.values()), "owner": owner})
    return {int(r[0]) for r in await cur.fetchall()}


async def move_cursors(conn: Conn, cursors: dict[tuple[int, int], int | None], *,
                       owner: str) -> None:
    """Set destinations' own positions (None: drop the cursor, the frontier covers it)."""
    if cursors:
        await conn.execute(query("eventlog.sql", "move_cursors"), {
            "destination_keys": [d for d, _ in cursors],
            "partitions": [p for _, p in cursors],
            "positions": list(cursors.values()),
            "owner": owner,
        })


def _epochs(times: Sequence[datetime]) -> list[str]:
    """Times as exact epoch seconds with six decimals (to_timestamp() reads them back to the
    microsecond)."""
    out = []
    for t in times:
        delta = t - _EPOCH
        out.append(f"{delta.days * 86400 + delta.seconds}.{delta.microseconds:06d}")
    return out



# --- how far back the log reaches ----------------------------------------------------------

async def oldest_retained(conn: Conn) -> tuple[int, datetime] | None:
    """The oldest retained event's id and time: every event accepted from it on is still in
    the log (None: the log is empty). Replay and backfill reach back to it, no further.

    Maintenance keeps events for RELAYQ_EVENT_RETENTION_SECONDS (jobsdb.partitions.sweep)
    and raises the log's floor whenever it removes any (a dropped partition, a compaction),
    so an older event kept below a hole (a partition held by one unfinished job) is not
    counted: the answer is where the log is whole from (migration 0016,
    event_log_oldest_retained(), which SQL callers can use in the same snapshot)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("eventlog.sql", "oldest_retained"))
    row = await cur.fetchone()
    return (int(row["event_id"]), row["created_at"]) if row else None


@dataclass(frozen=True, slots=True)
class LogSize:
    bytes: int
    # From each partition's id span (ids of rolled back ingest transactions count too).
    events: int
    oldest: tuple[int, datetime] | None


async def size(conn: Conn) -> LogSize:
    """The log's size on disk and in events, and its oldest retained event (no row read but
    two index probes per partition): for GetStats and `relayq stats`."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("eventlog.sql", "size"))
    row = await cur.fetchone()
    assert row is not None
    return LogSize(int(row["bytes"]), int(row["events"]), await oldest_retained(conn))
