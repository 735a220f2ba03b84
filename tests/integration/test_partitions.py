"""Old partitions of the event log (events, deliveries, job rows and their history, numbered
alike): dropped once every cursor has read them, their jobs are finished and nothing changed
for the retention period; compacted when a few unfinished jobs would keep them; scanned only
when first seen finished and when due."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection

from jobsdb import partitions
from tests.factories import insert_jobs
from tests.helpers import event
from tests.pipeline import World, recorded_attempts, send, wait_until_finished
from tests.poll import eventually
from tests.services import ingest, router
from tests.sinks import OK, Answer, Received

DAY = timedelta(days=1)
P0 = "events_p00000000"
GROUP_0 = ["events_p00000000", "deliveries_p00000000", "jobs_p00000000",
           "job_statuses_p00000000"]


async def _age_partition_0(conn: AsyncConnection[Any], *, read: bool = True) -> None:
    """Move the sequence three partitions on, so partition 0 is no longer among the newest;
    and (unless told otherwise) every cursor past it, as routers that read it leave them."""
    await partitions.ensure(conn, upto_event_id=3_000_000)
    await conn.execute("SELECT setval('events_event_id_seq', 3000000)")
    if read:
        await conn.execute("UPDATE router_leases SET frontier = 3000000")


async def _quiet(conn: AsyncConnection[Any], ago: str = "2 days") -> None:
    """Nothing happened in partition 0 for this long: its events and job rows are as old."""
    await conn.execute("UPDATE events SET created_at = now() - %s::interval", (ago,))
    await conn.execute("UPDATE jobs SET updated_at = now() - %s::interval", (ago,))


async def _scans(conn: AsyncConnection[Any], table: str = P0) -> int:
    """Sequential scans of `table` so far (this backend's counts flushed first)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT 1")  # the flush happens when a statement ends
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    cur = await conn.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = %s",
                             (table,))
    return int((await cur.fetchone() or [0])[0])


async def _watch(conn: AsyncConnection[Any]) -> tuple[Any, ...] | None:
    cur = await conn.execute(
        "SELECT finished_at IS NOT NULL, sparse_at IS NOT NULL FROM job_partitions"
        " WHERE number = 0")
    return await cur.fetchone()


async def test_a_finished_partition_goes_once_quiet_for_the_retention_period(
    conn: AsyncConnection[Any],
) -> None:
    old = await insert_jobs(conn, 3, start=10)
    await conn.execute("UPDATE jobs SET state = 'succeeded'")
    await _quiet(conn)
    await _age_partition_0(conn)

    swept = await partitions.sweep(conn, retention=3 * DAY, compact_below=10)
    assert swept.dropped == []  # finished, but not old enough
    assert await _watch(conn) == (True, False)
    storage = await partitions.storage(conn)
    assert (storage.finished, storage.sparse) == (1, 0)
    # 0-2, then 3-5 ahead, of each table.
    assert storage.partitions == {"events": 6, "deliveries": 6, "jobs": 6, "job_statuses": 6}
    await conn.execute("UPDATE jobs SET state = 'pending' WHERE job_id = %s", (old[0],))
    swept = await partitions.sweep(conn, retention=DAY, compact_below=10)
    assert swept.dropped == []  # unfinished
    assert await _watch(conn) == (False, True)
    await conn.execute("UPDATE jobs SET state = 'aborted' WHERE job_id = %s", (old[0],))
    await _quiet(conn)
    swept = await partitions.sweep(conn, retention=DAY, compact_below=10)
    assert swept.dropped == GROUP_0
    for table in ("events", "jobs"):
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        assert (await cur.fetchone() or [None])[0] == 0
    assert await _watch(conn) is None  # the note went with the partition


async def test_a_partition_goes_only_once_every_cursor_has_read_it(
    conn: AsyncConnection[Any],
) -> None:
    """The events of a partition are kept for as long as any cursor is below them: the
    frontier of an ordering partition no router has read that far, or the cursor of a
    destination that lags (paused, say). A destination no connection feeds any more holds
    nothing back: its cursors are forgotten."""
    await insert_jobs(conn, 3, start=10)
    await conn.execute("UPDATE jobs SET state = 'succeeded'")
    await _quiet(conn)
    await _age_partition_0(conn, read=False)
    await conn.execute("UPDATE router_leases SET frontier = 3000000 WHERE partition <> 7")
    await conn.execute("UPDATE router_leases SET frontier = 999998 WHERE partition = 7")
    # One event short of the end of partition 0 (ids 0 to 999999) in one ordering partition.
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).dropped == []
    await conn.execute("UPDATE router_leases SET frontier = 3000000")
    cur = await conn.execute("SELECT destination_key FROM destinations")
    (destination,) = [r[0] for r in await cur.fetchall()]
    await conn.execute("INSERT INTO destination_cursors (destination_key, partition, position)"
                       " VALUES (%s, 3, 12)", (destination,))
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).dropped == []
    await conn.execute("UPDATE connections SET enabled = false")
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).dropped == GROUP_0
    cur = await conn.execute("SELECT count(*) FROM destination_cursors")
    assert await cur.fetchone() == (0,)


async def test_a_finished_partition_is_read_when_first_seen_and_when_due_not_every_round(
    conn: AsyncConnection[Any],
) -> None:
    await insert_jobs(conn, 50, start=10)
    await conn.execute("UPDATE jobs SET state = 'succeeded'")
    await _age_partition_0(conn)
    before = await _scans(conn)
    await partitions.sweep(conn, retention=DAY, compact_below=10)
    assert await _scans(conn) == before + 1  # first seen finished: when did it last change?
    for _ in range(3):
        assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).dropped == []
    assert await _scans(conn) == before + 1  # not due: not read again

    # Due by the note, but an operator retried a job meanwhile and it finished again: the
    # second look finds the change, and the partition waits for the retention period from it.
    await conn.execute("UPDATE events SET created_at = now() - interval '2 days'")
    await conn.execute("UPDATE job_partitions SET finished_at = now() - interval '2 days'")
    before = await _scans(conn) - 1  # the UPDATE read it
    swept = await partitions.sweep(conn, retention=DAY, compact_below=10)
    assert swept.dropped == []
    assert await _scans(conn) == before + 2
    cur = await conn.execute("SELECT finished_at > now() - interval '1 minute' FROM"
                             " job_partitions WHERE number = 0")
    assert await cur.fetchone() == (True,)


async def _states(conn: AsyncConnection[Any]) -> dict[int, tuple[Any, ...]]:
    cur = await conn.execute("SELECT * FROM jobs ORDER BY job_id")
    return {row[0]: tuple(row) for row in await cur.fetchall()}


async def test_a_sparse_partition_is_compacted_keeping_unfinished_and_recent_jobs_whole(
    conn: AsyncConnection[Any],
) -> None:
    ids = await insert_jobs(conn, 3000, start=10)
    stuck, behind, recent = ids[100], ids[200], ids[300]
    await conn.execute(
        "UPDATE jobs SET state = 'succeeded', attempts = 1,"
        " updated_at = now() - interval '2 days'")
    await conn.execute("UPDATE events SET created_at = now() - interval '2 days'")
    await conn.execute(
        "INSERT INTO job_statuses (job_id, attempt, state, started_at, actor)"
        " SELECT job_id, 1, 'succeeded', now(), 'router:test' FROM jobs")
    await conn.execute(
        "UPDATE jobs SET state = 'failed', retry_at = now() + interval '1 hour', updated_at ="
        " now() - interval '5 days' WHERE job_id = %s", (stuck,))
    await conn.execute("INSERT INTO job_statuses (job_id, attempt, state, error_code, started_at,"
                       " actor) VALUES (%s, 2, 'failed', '503', now(), 'router:test')", (stuck,))
    await conn.execute("UPDATE jobs SET state = 'waiting', blocked_by = %s, updated_at ="
                       " now() - interval '5 days' WHERE job_id = %s", (stuck, behind))
    await conn.execute("UPDATE jobs SET updated_at = now() WHERE job_id = %s", (recent,))
    await _age_partition_0(conn)
    before = await _states(conn)
    size_before = await _size(conn)

    swept = await partitions.sweep(conn, retention=DAY, compact_below=10)
    assert swept.compacted == []  # sparse from now on; compacted a retention period later
    assert await _watch(conn) == (False, True)
    await conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
    swept = await partitions.sweep(conn, retention=DAY, compact_below=10)
    assert swept.compacted == [P0]
    assert swept.dropped == []

    after = await _states(conn)
    assert sorted(after) == [stuck, behind, recent]
    assert {k: before[k] for k in after} == after  # every column as it was
    cur = await conn.execute("SELECT job_id, attempt FROM job_statuses ORDER BY 1, 2")
    assert await cur.fetchall() == [(stuck, 1), (stuck, 2), (behind, 1), (recent, 1)]
    # Their events stay, for their documents; the other events went.
    cur = await conn.execute("SELECT event_id FROM events ORDER BY 1")
    assert [r[0] for r in await cur.fetchall()] == [j >> 16 for j in (stuck, behind, recent)]
    assert await _size(conn) < size_before / 5  # what is left is mostly empty index pages
    # Compacted just now: the next rounds leave it alone.
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == []


async def test_a_partition_with_many_unfinished_jobs_is_never_compacted(
    conn: AsyncConnection[Any],
) -> None:
    await insert_jobs(conn, 40, start=10)
    await _quiet(conn)
    await conn.execute(
        "UPDATE jobs SET state = 'succeeded' WHERE job_id IN"
        " (SELECT job_id FROM jobs ORDER BY job_id LIMIT 30)")
    await _age_partition_0(conn)
    # Ten unfinished: not fewer than compact_below.
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == []
    assert await _watch(conn) is None  # nothing to note about a busy partition
    await conn.execute("UPDATE jobs SET state = 'succeeded' WHERE job_id IN"
                       " (SELECT job_id FROM jobs WHERE state = 'pending' LIMIT 9)")
    # compact_below 0 turns it off altogether, even with one job left.
    assert (await partitions.sweep(conn, retention=DAY, compact_below=0)).compacted == []
    assert await _watch(conn) is None


async def _one_unfinished_in_100(conn: AsyncConnection[Any]) -> None:
    """Partition 0, old: 100 jobs, all but the first finished two days ago."""
    ids = await insert_jobs(conn, 100, start=10)
    await _quiet(conn)
    await conn.execute("UPDATE jobs SET state = 'succeeded' WHERE job_id <> %s", (ids[0],))
    await _age_partition_0(conn)


async def test_compaction_gives_way_to_a_session_using_the_partition(
    conn: AsyncConnection[Any], database: str,
) -> None:
    await _one_unfinished_in_100(conn)
    async with await AsyncConnection.connect(database) as reader:
        await reader.execute("SELECT count(*) FROM jobs_p00000000")  # holds its lock, idle
        # A young transaction: compaction reads the partition, then cannot rewrite it.
        assert await partitions.compact(conn, 0, retention=DAY, lock_timeout_ms=100) \
            is partitions.Compaction.GAVE_UP
        await asyncio.sleep(1.2)
        # Held for over a second: left alone before reading anything.
        before = await _scans(conn)
        assert await partitions.compact(conn, 0, retention=DAY) \
            is partitions.Compaction.IN_USE
        assert await _scans(conn) == before
        await reader.rollback()
    cur = await conn.execute("SELECT count(*) FROM jobs")
    assert await cur.fetchone() == (100,)
    assert await partitions.compact(conn, 0, retention=DAY) is partitions.Compaction.DONE
    cur = await conn.execute("SELECT count(*) FROM jobs")
    assert await cur.fetchone() == (1,)
    assert await partitions.compact(conn, 0, retention=DAY) \
        is partitions.Compaction.NOTHING_TO_REMOVE


async def test_a_compaction_given_up_on_waits_before_the_next_try(
    conn: AsyncConnection[Any], database: str,
) -> None:
    await _one_unfinished_in_100(conn)
    await partitions.sweep(conn, retention=DAY, compact_below=10)
    await conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
    async with await AsyncConnection.connect(database) as reader:
        await reader.execute("SELECT count(*) FROM jobs_p00000000")
        assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == []
        await reader.rollback()
    cur = await conn.execute("SELECT compact_after > now() FROM job_partitions")
    assert await cur.fetchone() == (True,)
    before = await _scans(conn)
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == []
    assert await _scans(conn) == before  # backing off: not even read
    await conn.execute("UPDATE job_partitions SET compact_after = now()")
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == [P0]


async def test_one_compaction_a_round(conn: AsyncConnection[Any]) -> None:
    for start in (10, 1_000_010):
        ids = await insert_jobs(conn, 50, start=start)
        await conn.execute("UPDATE jobs SET state = 'succeeded' WHERE job_id = ANY(%s)",
                           (ids[1:],))
    await _quiet(conn)
    await partitions.ensure(conn, upto_event_id=4_000_000)
    await conn.execute("SELECT setval('events_event_id_seq', 4000000)")
    await conn.execute("UPDATE router_leases SET frontier = 4000000")
    await partitions.sweep(conn, retention=DAY, compact_below=10)
    await conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == [P0]
    assert (await partitions.sweep(conn, retention=DAY, compact_below=10)).compacted == [
        "events_p00000001"]


async def _size(conn: AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT sum(pg_total_relation_size(t))::bigint"
                             " FROM unnest(%s::regclass[]) AS t", (GROUP_0,))
    return int((await cur.fetchone() or [0])[0])


async def test_sweep_needs_autocommit(database: str) -> None:
    async with await AsyncConnection.connect(database) as conn:
        with pytest.raises(ValueError, match="autocommit"):
            await partitions.sweep(conn, retention=DAY, compact_below=10)


async def test_a_router_delivering_from_a_partition_keeps_order_through_its_compaction(
    world: World,
) -> None:
    """One user's job keeps failing while everything else is delivered: the partition is sparse.
    It is compacted while the router retries that job, and then, once the destination
    recovers, the user's jobs arrive in order and every attempt the sink saw is on record."""
    await world.destination("d", max_attempts=1000)
    failing = True

    def answer(delivery: Received) -> Answer:
        return Answer(503) if failing and delivery.user_id == "stuck" else OK

    world.webhook.answer = answer
    sent = [event(f"m{i}", "stuck" if i % 10 == 3 else f"u{i % 7}") for i in range(300)]
    async with ingest(world.database) as service, router(world.database) as relay:
        ids = await send(service, world.source, sent)
        stuck = [j for e, j in zip(sent, ids, strict=True) if e.user_id == "stuck"]
        await wait_until_finished(world.conn, len(ids) - len(stuck))
        await world.webhook.wait_for(
            lambda: sum(r.job_id == stuck[0] for r in world.webhook.received) >= 3)
        engine = relay.app.engine
        assert engine is not None
        await world.conn.execute("UPDATE events SET created_at = now() - interval '2 days'")
        await world.conn.execute("UPDATE deliveries SET recorded_at = now() - interval '2 days'")
        await partitions.ensure(world.conn, upto_event_id=3_000_000)
        await world.conn.execute("SELECT setval('events_event_id_seq', 3000000)")

        async def read_past() -> bool:  # the router's frontiers follow the log's head
            engine.log.wake()
            cur = await world.conn.execute("SELECT min(frontier) FROM router_leases")
            return (await cur.fetchone() or [0])[0] == 3_000_000

        await eventually(read_past, what="every frontier past partition 0")
        assert (await partitions.sweep(world.conn, retention=DAY, compact_below=100)
                ).compacted == []
        await world.conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
        for _ in range(20):
            swept = await partitions.sweep(world.conn, retention=DAY, compact_below=100)
            if swept.compacted:
                break
            # Given up on: the router's flush held the partition (a lock timeout, or the
            # deadlock of upgrading to ACCESS EXCLUSIVE, which Postgres reports at once).
            # Make the next round due instead of waiting RETRY_COMPACTION.
            await world.conn.execute("UPDATE job_partitions SET compact_after = now()")
        assert swept.compacted == [P0]
        cur = await world.conn.execute("SELECT count(*) FROM jobs")
        assert await cur.fetchone() == (len(stuck),)
        cur = await world.conn.execute("SELECT count(*) FROM events")
        assert await cur.fetchone() == (len(stuck),)
        failing = False
        await wait_until_finished(world.conn, len(stuck))
    assert [r.job_id for r in world.webhook.oks if r.user_id == "stuck"] == stuck
    attempts = sum(r.job_id == stuck[0] for r in world.webhook.received)
    assert (await recorded_attempts(world.conn))[stuck[0]] == attempts
