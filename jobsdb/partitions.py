"""Range partitions of the event log and what goes with it: created ahead, dropped when every
cursor has passed them and the retention has elapsed, compacted when a few unfinished jobs
would otherwise keep a million settled events.

Partition n of `events` and `deliveries` holds event ids [n * size, (n + 1) * size); partition
n of `jobs` and `job_statuses` holds the job ids of those events (event_id << 16 | slot), so
the four go together. New partitions are built as plain tables and then ATTACHed, which takes
only a SHARE UPDATE EXCLUSIVE lock on the parent, so creating one never blocks ingest or
delivery. Settled partitions are DETACHed CONCURRENTLY and dropped: space comes back at once,
with no DELETE and no vacuum debt. A partition that keeps a few unfinished jobs is rewritten
with only them and their events (TRUNCATE and write back), for the same reason.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import class_row, dict_row, kwargs_row

from jobsdb import locks
from jobsdb.keyspace import SLOT_BITS
from jobsdb.sqlfile import query

log = logging.getLogger(__name__)

# Each table's partition key, as a shift of the event id: job ids are event ids << 16.
SHIFTS = {"events": 0, "deliveries": 0, "jobs": SLOT_BITS, "job_statuses": SLOT_BITS}
TABLES = tuple(SHIFTS)
# Partitions kept ready beyond the one the sequence is in.
AHEAD = 2
# A compaction given up on after reading its partition is not tried again before this.
RETRY_COMPACTION = timedelta(minutes=10)


@dataclass(frozen=True)
class Settings:
    ordering_partitions: int
    # Event ids per partition.
    event_partition_size: int


async def settings(conn: AsyncConnection[Any]) -> Settings:
    cur = conn.cursor(row_factory=class_row(_Setting))
    await cur.execute(query("partitions.sql", "settings"))
    values = {row.name: row.value for row in await cur.fetchall()}
    return Settings(
        ordering_partitions=int(values["ordering_partitions"]),
        event_partition_size=int(values["event_partition_size"]),
    )


class _Setting(NamedTuple):
    name: str
    value: str


def partition_name(table: str, number: int) -> str:
    return f"{table}_p{number:08d}"


async def ensure(conn: AsyncConnection[Any], *, upto_event_id: int | None = None) -> list[str]:
    """Create any missing partition from the sequence's position (or upto_event_id) to AHEAD
    beyond.

    Runs its own transaction on `conn` (which must not be in one) and returns the tables made.
    """
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (locks.PARTITIONS,))
        size = (await settings(conn)).event_partition_size
        cur = await conn.execute(query("partitions.sql", "sequence_position"))
        row = await cur.fetchone()
        position = max(int(row[0]) if row else 0, upto_event_id or 0)
        wanted = range(position // size, position // size + AHEAD + 1)
        for table in TABLES:
            have = {_number(table, p.lower, size) for p in await _existing(conn, table)}
            for number in wanted:
                if number not in have:
                    await _create(conn, table, number, size)
                    created.append(partition_name(table, number))
    for name in created:
        log.info("created partition %s", name)
    return created


@dataclass(frozen=True)
class Watch:
    """What maintenance noted about an old partition (a row of job_partitions)."""

    finished_at: datetime | None = None
    sparse_at: datetime | None = None
    compact_after: datetime | None = None


def _watched(*, number: int, **noted: datetime | None) -> tuple[int, Watch]:
    return number, Watch(**noted)


@dataclass(frozen=True)
class Swept:
    dropped: list[str] = field(default_factory=list)
    compacted: list[str] = field(default_factory=list)


async def sweep(
    conn: AsyncConnection[Any], *, retention: timedelta, compact_below: int,
    event_retention: timedelta | None = None, keep_newest: int = AHEAD + 1,
) -> Swept:
    """Drop old partitions that every cursor has passed, whose jobs all finished, in which
    nothing changed for `retention` and whose newest event is older than `event_retention`
    (the log kept for replay and backfill: RELAYQ_EVENT_RETENTION_SECONDS; None: the same as
    `retention`); compact old ones that kept fewer than `compact_below` unfinished jobs for
    as long (0: never), keeping the events of the event retention period.

    Whatever removes events raises the log's floor (migration 0016), so
    jobsdb.eventlog.oldest_retained answers where the log is whole from.

    The newest `keep_newest` partitions are left alone. What each round saw is kept in
    job_partitions (migration 0005 says why), so a partition is scanned when it is first seen
    finished and when it is due, not every round. Needs an autocommit connection: DETACH ...
    CONCURRENTLY cannot run inside a transaction block.
    """
    if not conn.autocommit:
        raise ValueError("sweep needs an autocommit connection")
    kept_events = retention if event_retention is None else event_retention
    size = (await settings(conn)).event_partition_size
    cur = await conn.execute(query("partitions.sql", "sequence_position"))
    row = await cur.fetchone()
    current = (int(row[0]) if row else 0) // size
    await conn.execute(query("partitions.sql", "forget_cursors"))
    cur = await conn.execute(query("partitions.sql", "cursors_passed"))
    row = await cur.fetchone()
    passed = int(row[0]) if row and row[0] is not None else -1
    cur = conn.cursor(row_factory=kwargs_row(_watched))
    await cur.execute(query("partitions.sql", "watched"))
    watched = dict(await cur.fetchall())
    now = await _now(conn)
    swept = Swept()
    gone: list[int] = []
    tried_compaction = False
    for partition in await _existing(conn, "events"):
        number = partition.lower // size
        if number > current - keep_newest:
            continue
        seen = watched.pop(number, Watch())
        names = _names(number)
        if passed < (number + 1) * size - 1:
            watch = Watch()  # a cursor has not read all of it yet: nothing to decide
        else:
            unfinished = await _unfinished(conn, names, cap=max(compact_below, 1))
            if unfinished == 0:
                finished_at = seen.finished_at
                due = finished_at is None or finished_at < now - retention
                if due and finished_at is not None:
                    # Its events are kept longer (an index probe): its last change, a scan,
                    # is read again only once they are old enough to go.
                    due = await _events_older(conn, names, now - kept_events)
                if due:
                    # First seen finished, or due: when did it last change? (Again when due:
                    # an operator may have retried a job since, which has finished again.)
                    finished_at = await _last_change(conn, names)
                if ((finished_at is None or finished_at < now - retention)
                        and await _events_older(conn, names, now - kept_events)):
                    await _raise_floor(conn, names)
                    for table in TABLES:
                        await _drop(conn, table, partition_name(table, number))
                        swept.dropped.append(partition_name(table, number))
                    gone.append(number)
                    continue
                watch = Watch(finished_at=finished_at)
            elif unfinished < compact_below:
                sparse_at = seen.sparse_at or now
                watch = Watch(sparse_at=sparse_at, compact_after=seen.compact_after)
                due = sparse_at < now - retention and (seen.compact_after is None
                                                       or seen.compact_after <= now)
                # One attempt a round: each holds off every router's writes for a read of a
                # partition, and those should not come back to back.
                if due and not tried_compaction:
                    outcome = await compact(conn, number, retention=retention,
                                            event_retention=kept_events)
                    tried_compaction = outcome is not Compaction.IN_USE
                    if outcome is Compaction.DONE:
                        swept.compacted.append(partition_name("events", number))
                    if outcome in (Compaction.DONE, Compaction.NOTHING_TO_REMOVE):
                        # Anything finishing from now on is removable a retention period later.
                        watch = Watch(sparse_at=now)
                    elif outcome is Compaction.GAVE_UP:
                        watch = Watch(sparse_at=sparse_at,
                                      compact_after=now + RETRY_COMPACTION)
            else:
                watch = Watch()
        if watch != seen:
            await conn.execute(query("partitions.sql", "watch"),
                               {"number": number, **asdict(watch)})
    gone.extend(watched)  # notes on partitions that no longer exist
    if gone:
        await conn.execute(query("partitions.sql", "unwatch"), {"numbers": gone})
    swept.dropped.extend(await _drop_legacy(conn, now - retention))
    for name in swept.dropped:
        log.info("dropped finished partition %s", name)
    return swept


def lookup_index_name(number: int) -> str:
    return f"{partition_name('events', number)}_lookup"


async def index_lookups(conn: AsyncConnection[Any], *, at_most: int = 1) -> list[str]:
    """Build the (source_key, message_id) index GetEvent finds an event by message id with,
    on up to `at_most` events partitions that ingest has left (every id of the partition is
    drawn and settled: below the log's horizon), oldest first. Ingest never pays for it: the
    partition it writes has none (GetEvent scans that one). CONCURRENTLY, so nothing waits;
    an index a failed build left invalid is dropped and built again. Needs an autocommit
    connection. Returns the indexes built."""
    if not conn.autocommit:
        raise ValueError("index_lookups needs an autocommit connection")
    size = (await settings(conn)).event_partition_size
    cur = await conn.execute(query("partitions.sql", "horizon"))
    row = await cur.fetchone()
    horizon = int(row[0]) if row else 0
    lookups = conn.cursor(row_factory=dict_row)
    await lookups.execute(query("partitions.sql", "lookup_indexes"))
    valid = {r["name"]: r["valid"] for r in await lookups.fetchall()}
    built: list[str] = []
    for name, lower in await _existing(conn, "events"):
        number = lower // size
        if (number + 1) * size > horizon or len(built) >= at_most:
            break
        index = lookup_index_name(number)
        if valid.get(index):
            continue
        if index in valid:
            await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(index)))
        started = time.perf_counter()
        await conn.execute(sql.SQL(query("partitions.sql", "lookup_index")).format(
            index=sql.Identifier(index), partition=sql.Identifier(name)))
        log.info("built index %s", index,
                 extra={"seconds": round(time.perf_counter() - started, 3)})
        built.append(index)
    return built


def _names(number: int) -> dict[str, sql.Identifier]:
    """The partitions of one number, as query placeholders name them."""
    return {"events": sql.Identifier(partition_name("events", number)),
            "deliveries": sql.Identifier(partition_name("deliveries", number)),
            "jobs": sql.Identifier(partition_name("jobs", number)),
            "statuses": sql.Identifier(partition_name("job_statuses", number))}


async def _drop_legacy(conn: AsyncConnection[Any], before: datetime) -> list[str]:
    """Partitions of the job tables from before the event log (kept by migration 0012 for
    reference) in which nothing changed since `before`; the tables once they are empty."""
    cur = await conn.execute(query("partitions.sql", "legacy_exists"))
    row = await cur.fetchone()
    if not row or not row[0]:
        return []
    dropped: list[str] = []
    remaining = 0
    for name in [p.name for p in await _existing(conn, "jobs_v1")]:
        cur = await conn.execute(sql.SQL(query("partitions.sql", "legacy_last_change")).format(
            partition=sql.Identifier(name)))
        row = await cur.fetchone()
        last = row[0] if row else None
        if last is not None and last >= before:
            remaining += 1
            continue
        statuses = name.replace("jobs_v1_", "job_statuses_v1_", 1)
        for parent, child in (("jobs_v1", name), ("job_statuses_v1", statuses)):
            await _drop(conn, parent, child)
            dropped.append(child)
    if not remaining:
        await conn.execute(query("partitions.sql", "legacy_drop"))
        dropped.append("jobs_v1")
    return dropped


class Compaction(enum.Enum):
    DONE = "done"
    NOTHING_TO_REMOVE = "nothing to remove"
    IN_USE = "in use"  # a long transaction holds the partition: nothing tried, try next round
    GAVE_UP = "gave up"  # a lock could not be had in time, after reading the partition


async def compact(conn: AsyncConnection[Any], number: int, *, retention: timedelta,
                  event_retention: timedelta | None = None,
                  lock_timeout_ms: int = 500) -> Compaction:
    """Rewrite partition group `number` with only its unfinished jobs and the jobs that
    changed within `retention`, with their history and their events, and the events and
    deliveries of the event retention period (None: `retention`), raising the log's floor
    past the last event it removes.

    What stays is read under an EXCLUSIVE lock, which lets readers (routers' pickups) go on
    and holds off writers: every router's outcome writes wait for one read of the partition
    (their release of waiting jobs is not pruned to a partition). Only the rewrite itself,
    milliseconds for a few rows, holds ACCESS EXCLUSIVE (measured in docs/benchmarks.md).

    A transaction that has held the partition for over a second (idle in transaction, a long
    report, pg_dump) would make the second lock wait, so the partition is left alone while
    one does. Each lock is asked for with a short lock_timeout and given up on if busy, so
    a long query never makes every other session queue behind this one; a compaction given
    up on after its read is not tried again for RETRY_COMPACTION.
    """
    names = _names(number)
    relations = [partition_name(table, number) for table in TABLES]
    cur = await conn.execute(query("partitions.sql", "held_long"), {"relations": relations})
    row = await cur.fetchone()
    if row and row[0]:
        log.info("compacting partition %d waits: a long transaction holds it", number)
        return Compaction.IN_USE
    kept = {"retention": retention,
            "event_retention": retention if event_retention is None else event_retention}
    cur = await conn.execute(
        sql.SQL(query("partitions.sql", "removable_exists")).format(**names), kept)
    row = await cur.fetchone()
    if not row or not row[0]:
        return Compaction.NOTHING_TO_REMOVE
    started = time.perf_counter()
    locked = sql.SQL(", ").join(names.values())
    try:
        async with conn.transaction():
            await _lock_timeout(conn, lock_timeout_ms)
            await conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(locked))
            for step in ("compact_keep", "compact_keep_statuses", "compact_keep_events",
                         "compact_keep_deliveries"):
                await conn.execute(sql.SQL(query("partitions.sql", step)).format(**names),
                                   kept)
            cur = await conn.execute("SELECT count(*) FROM compact_jobs")
            kept_jobs = (await cur.fetchone() or [0])[0]
            await conn.execute(sql.SQL(query("partitions.sql", "compact_floor")).format(**names))
            # Waiting for this one holds up new readers too: shorter.
            await _lock_timeout(conn, min(lock_timeout_ms, 200))
            await conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(locked))
            await conn.execute(sql.SQL(query("partitions.sql", "compact_rewrite")).format(**names))
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
        log.warning("compacting partition %d given up on for now: %s", number, exc)
        return Compaction.GAVE_UP
    log.info("compacted partition %d", number,
             extra={"kept": kept_jobs, "seconds": round(time.perf_counter() - started, 3)})
    return Compaction.DONE


async def _lock_timeout(conn: AsyncConnection[Any], ms: int) -> None:
    await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{ms}ms")))


async def _unfinished(conn: AsyncConnection[Any], names: dict[str, sql.Identifier], *,
                      cap: int) -> int:
    cur = await conn.execute(
        sql.SQL(query("partitions.sql", "unfinished_count")).format(**names), {"cap": cap})
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _last_change(conn: AsyncConnection[Any], names: dict[str, sql.Identifier]
                       ) -> datetime | None:
    cur = await conn.execute(sql.SQL(query("partitions.sql", "last_change")).format(**names))
    row = await cur.fetchone()
    return row[0] if row else None


async def _events_older(conn: AsyncConnection[Any], names: dict[str, sql.Identifier],
                        before: datetime) -> bool:
    """Whether a partition's newest event (by id: one index probe) is older than `before`,
    or it has none."""
    cur = await conn.execute(sql.SQL(query("partitions.sql", "newest_event")).format(**names))
    row = await cur.fetchone()
    return row is None or row[0] < before


async def _raise_floor(conn: AsyncConnection[Any], names: dict[str, sql.Identifier]) -> None:
    """A partition's events are going: the log is whole only above its newest (an empty
    partition removes nothing, and raises nothing)."""
    await conn.execute(sql.SQL(query("partitions.sql", "raise_floor")).format(**names))


async def _now(conn: AsyncConnection[Any]) -> datetime:
    cur = await conn.execute("SELECT now()")
    row = await cur.fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Storage:
    partitions: dict[str, int]  # per table
    bytes: dict[str, int]  # per table, on disk
    # Old jobs partitions noted finished (dropped once quiet for the retention period) and
    # sparse (compacted once sparse for as long).
    finished: int
    sparse: int


class _TableStorage(NamedTuple):
    parent: str
    partitions: int
    bytes: int
    finished: int
    sparse: int


async def storage(conn: AsyncConnection[Any]) -> Storage:
    """What job storage takes; cheap enough for every metrics scrape (catalog and file sizes)."""
    cur = conn.cursor(row_factory=class_row(_TableStorage))
    await cur.execute(query("partitions.sql", "storage"))
    rows = await cur.fetchall()
    return Storage(partitions={r.parent: int(r.partitions) for r in rows},
                   bytes={r.parent: int(r.bytes) for r in rows},
                   finished=int(rows[0].finished) if rows else 0,
                   sparse=int(rows[0].sparse) if rows else 0)


class Existing(NamedTuple):
    """One partition of a table: its name and the lower bound of its range."""

    name: str
    lower: int


async def _existing(conn: AsyncConnection[Any], table: str) -> list[Existing]:
    cur = conn.cursor(row_factory=class_row(Existing))
    await cur.execute(query("partitions.sql", "existing"), {"parent": table})
    return await cur.fetchall()


def _number(table: str, lower: int, size: int) -> int:
    return (lower >> SHIFTS[table]) // size


# Each table's partition key column.
_KEYS = {"events": "event_id", "deliveries": "first_event_id", "jobs": "job_id",
         "job_statuses": "job_id"}
# Autovacuum per table: job rows are updated once or twice each, vacuumed a little sooner
# than the default; the others are only ever inserted, vacuumed only for visibility maps.
_STORAGE = {
    "jobs": "autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02",
}
_INSERT_ONLY = "autovacuum_vacuum_insert_scale_factor = 0.5"


async def _create(conn: AsyncConnection[Any], table: str, number: int, size: int) -> None:
    name = sql.Identifier(partition_name(table, number))
    shift = SHIFTS[table]
    lower = sql.Literal((number * size) << shift)
    upper = sql.Literal(((number + 1) * size) << shift)
    storage = sql.SQL(_STORAGE.get(table, _INSERT_ONLY))
    await conn.execute(
        sql.SQL(
            "CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
            "WITH ({storage})"
        ).format(name=name, parent=sql.Identifier(table), storage=storage)
    )
    # The CHECK lets ATTACH skip its validation scan; the partition bound replaces it.
    check = sql.Identifier(f"{partition_name(table, number)}_range")
    await conn.execute(
        sql.SQL(
            "ALTER TABLE {name} ADD CONSTRAINT {check} "
            "CHECK ({key} IS NOT NULL AND {key} >= {lower} AND {key} < {upper})"
        ).format(name=name, check=check, key=sql.Identifier(_KEYS[table]),
                 lower=lower, upper=upper)
    )
    await conn.execute(
        sql.SQL(
            "ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ({lower}) TO ({upper})"
        ).format(parent=sql.Identifier(table), name=name, lower=lower, upper=upper)
    )
    await conn.execute(
        sql.SQL("ALTER TABLE {name} DROP CONSTRAINT {check}").format(name=name, check=check)
    )


async def _drop(conn: AsyncConnection[Any], table: str, name: str) -> None:
    await conn.execute(
        sql.SQL("ALTER TABLE {parent} DETACH PARTITION {name} CONCURRENTLY").format(
            parent=sql.Identifier(table), name=sql.Identifier(name))
    )
    await conn.execute(sql.SQL("DROP TABLE {name}").format(name=sql.Identifier(name)))
