"""Job-id range partitions of `jobs` and `job_statuses`: created ahead, dropped when finished,
compacted when a few unfinished jobs would otherwise keep a million finished ones.

Partition n of either table holds job ids [n * size, (n + 1) * size). New partitions are built
as plain tables and then ATTACHed, which takes only a SHARE UPDATE EXCLUSIVE lock on the parent,
so creating one never blocks ingest or delivery. Finished partitions are DETACHed CONCURRENTLY
and dropped: space comes back at once, with no DELETE and no vacuum debt. A partition that
keeps a few unfinished jobs is rewritten with only them (TRUNCATE and write back), for the
same reason.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from jobsdb import locks
from jobsdb.sqlfile import query

log = logging.getLogger(__name__)

TABLES = ("jobs", "job_statuses")
# Partitions kept ready beyond the one the sequence is in.
AHEAD = 2
# A compaction given up on after reading its partition is not tried again before this.
RETRY_COMPACTION = timedelta(minutes=10)


@dataclass(frozen=True)
class Settings:
    ordering_partitions: int
    job_partition_size: int


async def settings(conn: AsyncConnection[Any]) -> Settings:
    cur = await conn.execute(query("partitions.sql", "settings"))
    values = dict(await cur.fetchall())
    return Settings(
        ordering_partitions=int(values["ordering_partitions"]),
        job_partition_size=int(values["job_partition_size"]),
    )


def partition_name(table: str, number: int) -> str:
    return f"{table}_p{number:08d}"


async def ensure(conn: AsyncConnection[Any], *, upto_job_id: int | None = None) -> list[str]:
    """Create any missing partition from the sequence's position (or upto_job_id) to AHEAD beyond.

    Runs its own transaction on `conn` (which must not be in one) and returns the tables made.
    """
    created: list[str] = []
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (locks.PARTITIONS,))
        size = (await settings(conn)).job_partition_size
        cur = await conn.execute(query("partitions.sql", "sequence_position"))
        row = await cur.fetchone()
        position = max(int(row[0]) if row else 0, upto_job_id or 0)
        wanted = range(position // size, position // size + AHEAD + 1)
        for table in TABLES:
            have = {lower // size for _, lower in await _existing(conn, table)}
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


@dataclass(frozen=True)
class Swept:
    dropped: list[str] = field(default_factory=list)
    compacted: list[str] = field(default_factory=list)


async def sweep(
    conn: AsyncConnection[Any], *, retention: timedelta, compact_below: int,
    keep_newest: int = AHEAD + 1,
) -> Swept:
    """Drop old partitions whose jobs all finished and stayed unchanged for `retention`;
    compact old ones that kept fewer than `compact_below` unfinished jobs for as long (0: never).

    The newest `keep_newest` partitions are left alone. What each round saw is kept in
    job_partitions (migration 0005 says why), so a partition is scanned when it is first seen
    finished and when it is due, not every round. Needs an autocommit connection: DETACH ...
    CONCURRENTLY cannot run inside a transaction block.
    """
    if not conn.autocommit:
        raise ValueError("sweep needs an autocommit connection")
    size = (await settings(conn)).job_partition_size
    cur = await conn.execute(query("partitions.sql", "sequence_position"))
    row = await cur.fetchone()
    current = (int(row[0]) if row else 0) // size
    cur = await conn.execute(query("partitions.sql", "watched"))
    watched = {r[0]: Watch(*r[1:]) for r in await cur.fetchall()}
    now = await _now(conn)
    swept = Swept()
    gone: list[int] = []
    tried_compaction = False
    for name, lower in await _existing(conn, "jobs"):
        number = lower // size
        if number > current - keep_newest:
            continue
        seen = watched.pop(number, Watch())
        unfinished = await _unfinished(conn, name, cap=max(compact_below, 1))
        if unfinished == 0:
            finished_at = seen.finished_at
            if finished_at is None or finished_at < now - retention:
                # First seen finished, or due: when did it last change? (Again when due: an
                # operator may have retried a job since, which has finished again.)
                finished_at = await _last_change(conn, name)
            if finished_at is None or finished_at < now - retention:
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
                outcome = await compact(conn, number, retention=retention)
                tried_compaction = outcome is not Compaction.IN_USE
                if outcome is Compaction.DONE:
                    swept.compacted.append(name)
                if outcome in (Compaction.DONE, Compaction.NOTHING_TO_REMOVE):
                    # Anything finishing from now on is removable a retention period later.
                    watch = Watch(sparse_at=now)
                elif outcome is Compaction.GAVE_UP:
                    watch = Watch(sparse_at=sparse_at, compact_after=now + RETRY_COMPACTION)
        else:
            watch = Watch()
        if watch != seen:
            await conn.execute(query("partitions.sql", "watch"),
                               {"number": number, **asdict(watch)})
    gone.extend(watched)  # notes on partitions that no longer exist
    if gone:
        await conn.execute(query("partitions.sql", "unwatch"), {"numbers": gone})
    for name in swept.dropped:
        log.info("dropped finished partition %s", name)
    return swept


class Compaction(enum.Enum):
    DONE = "done"
    NOTHING_TO_REMOVE = "nothing to remove"
    IN_USE = "in use"  # a long transaction holds the partition: nothing tried, try next round
    GAVE_UP = "gave up"  # a lock could not be had in time, after reading the partition


async def compact(conn: AsyncConnection[Any], number: int, *, retention: timedelta,
                  lock_timeout_ms: int = 500) -> Compaction:
    """Rewrite partition `number` of both tables with only its unfinished jobs and the jobs
    that changed within `retention`, with their history.

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
    jobs_name, statuses_name = (partition_name(table, number) for table in TABLES)
    names = {"jobs": sql.Identifier(jobs_name), "statuses": sql.Identifier(statuses_name)}
    cur = await conn.execute(query("partitions.sql", "held_long"),
                             {"relations": [jobs_name, statuses_name]})
    row = await cur.fetchone()
    if row and row[0]:
        log.info("compacting %s waits: a long transaction holds it", jobs_name)
        return Compaction.IN_USE
    cur = await conn.execute(
        sql.SQL(query("partitions.sql", "removable_exists")).format(partition=names["jobs"]),
        {"retention": retention})
    row = await cur.fetchone()
    if not row or not row[0]:
        return Compaction.NOTHING_TO_REMOVE
    started = time.perf_counter()
    try:
        async with conn.transaction():
            await _lock_timeout(conn, lock_timeout_ms)
            await conn.execute(sql.SQL("LOCK TABLE {jobs}, {statuses} IN EXCLUSIVE MODE")
                               .format(**names))
            await conn.execute(sql.SQL(query("partitions.sql", "compact_keep")).format(**names),
                               {"retention": retention})
            await conn.execute(
                sql.SQL(query("partitions.sql", "compact_keep_statuses")).format(**names))
            cur = await conn.execute("SELECT count(*) FROM compact_jobs")
            kept = (await cur.fetchone() or [0])[0]
            # Waiting for this one holds up new readers too: shorter.
            await _lock_timeout(conn, min(lock_timeout_ms, 200))
            await conn.execute(sql.SQL("LOCK TABLE {jobs}, {statuses} IN ACCESS EXCLUSIVE MODE")
                               .format(**names))
            await conn.execute(sql.SQL(query("partitions.sql", "compact_rewrite")).format(**names))
    except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
        log.warning("compacting %s given up on for now: %s", jobs_name, exc)
        return Compaction.GAVE_UP
    log.info("compacted partition %s", jobs_name,
             extra={"kept": kept, "seconds": round(time.perf_counter() - started, 3)})
    return Compaction.DONE


async def _lock_timeout(conn: AsyncConnection[Any], ms: int) -> None:
    await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{ms}ms")))


async def _unfinished(conn: AsyncConnection[Any], name: str, *, cap: int) -> int:
    cur = await conn.execute(
        sql.SQL(query("partitions.sql", "unfinished_count")).format(
            partition=sql.Identifier(name)), {"cap": cap})
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _last_change(conn: AsyncConnection[Any], name: str) -> datetime | None:
    cur = await conn.execute(
        sql.SQL(query("partitions.sql", "last_change")).format(partition=sql.Identifier(name)))
    row = await cur.fetchone()
    return row[0] if row else None


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


async def storage(conn: AsyncConnection[Any]) -> Storage:
    """What job storage takes; cheap enough for every metrics scrape (catalog and file sizes)."""
    cur = await conn.execute(query("partitions.sql", "storage"))
    rows = await cur.fetchall()
    return Storage(partitions={r[0]: int(r[1]) for r in rows},
                   bytes={r[0]: int(r[2]) for r in rows},
                   finished=int(rows[0][3]) if rows else 0,
                   sparse=int(rows[0][4]) if rows else 0)


async def _existing(conn: AsyncConnection[Any], table: str) -> list[tuple[str, int]]:
    cur = await conn.execute(query("partitions.sql", "existing"), {"parent": table})
    return [(name, int(lower)) for name, lower in await cur.fetchall()]


async def _create(conn: AsyncConnection[Any], table: str, number: int, size: int) -> None:
    name = sql.Identifier(partition_name(table, number))
    lower, upper = sql.Literal(number * size), sql.Literal((number + 1) * size)
    # jobs rows are updated once or twice each; status rows are only ever inserted. Vacuum
    # the first a little sooner than the default, and the second only for visibility maps.
    storage = (
        sql.SQL("autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02")
        if table == "jobs"
        else sql.SQL("autovacuum_vacuum_insert_scale_factor = 0.5")
    )
    await conn.execute(
        sql.SQL(
            "CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
            "WITH ({storage})"
        ).format(name=name, parent=sql.Identifier(table), storage=storage)
    )
    # The CHECK lets ATTACH skip its validation scan; the partition bound replaces it.
    await conn.execute(
        sql.SQL(
            "ALTER TABLE {name} ADD CONSTRAINT {check} "
            "CHECK (job_id IS NOT NULL AND job_id >= {lower} AND job_id < {upper})"
        ).format(name=name, check=sql.Identifier(f"{partition_name(table, number)}_range"),
                 lower=lower, upper=upper)
    )
    await conn.execute(
        sql.SQL(
            "ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ({lower}) TO ({upper})"
        ).format(parent=sql.Identifier(table), name=name, lower=lower, upper=upper)
    )
    await conn.execute(
        sql.SQL("ALTER TABLE {name} DROP CONSTRAINT {check}").format(
            name=name, check=sql.Identifier(f"{partition_name(table, number)}_range"))
    )


async def _drop(conn: AsyncConnection[Any], table: str, name: str) -> None:
    await conn.execute(
        sql.SQL("ALTER TABLE {parent} DETACH PARTITION {name} CONCURRENTLY").format(
            parent=sql.Identifier(table), name=sql.Identifier(name))
    )
    await conn.execute(sql.SQL("DROP TABLE {name}").format(name=sql.Identifier(name)))
