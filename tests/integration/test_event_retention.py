"""Retention of the event log (RELAYQ_EVENT_RETENTION_SECONDS): a partition goes only when
every cursor and job row has passed it AND its newest event is older than the event
retention; whatever removes events raises the floor, and oldest_retained says where the log
is whole from."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection

from jobsdb import eventlog, events, partitions
from relayq.config import ConfigError, Env, maintenance_policy
from tests.factories import insert_jobs

DAY = timedelta(days=1)
WEEK = timedelta(days=7)
SIZE = 1_000_000
GROUP_0 = ["events_p00000000", "deliveries_p00000000", "jobs_p00000000",
           "job_statuses_p00000000"]
GROUP_1 = [name.replace("p00000000", "p00000001") for name in GROUP_0]


async def _age(conn: AsyncConnection[Any], *, read: bool = True) -> None:
    """The sequence five partitions on, so partitions 0 and 1 are no longer among the
    newest; and (unless told otherwise) every cursor past them."""
    await partitions.ensure(conn, upto_event_id=5 * SIZE)
    await conn.execute("SELECT setval('events_event_id_seq', %s)", (5 * SIZE,))
    if read:
        await conn.execute("UPDATE router_leases SET frontier = %s", (5 * SIZE,))


async def _aged(conn: AsyncConnection[Any], ago: str) -> None:
    """Every event and job row this old, the jobs finished."""
    await conn.execute("UPDATE events SET created_at = now() - %s::interval", (ago,))
    await conn.execute("UPDATE jobs SET state = 'succeeded', updated_at = now() - %s::interval",
                       (ago,))


async def _oldest_id(conn: AsyncConnection[Any]) -> int | None:
    found = await eventlog.oldest_retained(conn)
    return found[0] if found else None


async def test_a_passed_partition_stays_until_its_events_are_older_than_the_retention(
        conn: AsyncConnection[Any]) -> None:
    assert await eventlog.oldest_retained(conn) is None  # an empty log
    [job] = await insert_jobs(conn, 1, start=10)
    await _aged(conn, "2 days")
    await _age(conn)
    # Read by every cursor, its jobs finished and quiet for the (job) retention: kept, as
    # its events are younger than the event retention.
    swept = await partitions.sweep(conn, retention=DAY, event_retention=WEEK,
                                   compact_below=10)
    assert GROUP_0[0] not in swept.dropped
    assert swept.dropped  # partitions 1 and 2, which hold no event, go
    oldest = await eventlog.oldest_retained(conn)
    assert oldest is not None
    assert oldest[0] == job >> 16
    size = await eventlog.size(conn)
    assert size.events == 1
    assert size.bytes > 0
    assert size.oldest == oldest
    await _aged(conn, "8 days")
    swept = await partitions.sweep(conn, retention=DAY, event_retention=WEEK, compact_below=10)
    assert swept.dropped == GROUP_0
    assert await eventlog.oldest_retained(conn) is None
    cur = await conn.execute("SELECT floor FROM event_log_floor")
    assert await cur.fetchone() == ((job >> 16) + 1,)


async def test_old_events_stay_while_a_cursor_has_not_passed_them(
        conn: AsyncConnection[Any]) -> None:
    await insert_jobs(conn, 1, start=10)
    await _aged(conn, "30 days")
    await _age(conn, read=False)
    assert (await partitions.sweep(conn, retention=DAY, event_retention=WEEK,
                                   compact_below=10)).dropped == []
    await conn.execute("UPDATE router_leases SET frontier = %s", (5 * SIZE,))
    swept = await partitions.sweep(conn, retention=DAY, event_retention=WEEK, compact_below=10)
    assert swept.dropped[:4] == GROUP_0


async def test_the_oldest_retained_event_is_where_the_log_is_whole_from(
        conn: AsyncConnection[Any]) -> None:
    """Partition 0 is kept by one unfinished job while partition 1 goes: its events are
    still there (GetEvent finds them) but the log is whole only from partition 2 on (whose
    events are within the retention)."""
    [stuck] = await insert_jobs(conn, 1, start=10)
    await insert_jobs(conn, 1, start=SIZE + 10)
    [later] = await insert_jobs(conn, 1, start=2 * SIZE + 10)
    await _aged(conn, "30 days")
    await conn.execute("UPDATE jobs SET state = 'failed' WHERE job_id = %s", (stuck,))
    await conn.execute("UPDATE events SET created_at = now() WHERE event_id = %s",
                       (later >> 16,))
    await _age(conn)
    swept = await partitions.sweep(conn, retention=DAY, event_retention=WEEK, compact_below=0)
    assert GROUP_1[0] in swept.dropped
    assert GROUP_0[0] not in swept.dropped
    assert await _oldest_id(conn) == later >> 16
    cur = await conn.execute("SELECT count(*) FROM events WHERE event_id = %s", (stuck >> 16,))
    assert await cur.fetchone() == (1,)


async def test_compaction_keeps_the_events_of_the_retention_and_raises_the_floor(
        conn: AsyncConnection[Any]) -> None:
    ids = await insert_jobs(conn, 100, start=10)
    await _aged(conn, "2 days")
    # The first half of the partition's events are older than the event retention.
    await conn.execute("UPDATE events SET created_at = now() - interval '8 days'"
                       " WHERE event_id < %s", (ids[50] >> 16,))
    await conn.execute("UPDATE jobs SET state = 'failed' WHERE job_id = %s", (ids[0],))
    await _age(conn)
    await partitions.sweep(conn, retention=DAY, event_retention=WEEK, compact_below=10)
    await conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
    swept = await partitions.sweep(conn, retention=DAY, event_retention=WEEK, compact_below=10)
    assert swept.compacted == ["events_p00000000"]
    cur = await conn.execute("SELECT event_id FROM events ORDER BY 1")
    kept = [r[0] for r in await cur.fetchall()]
    # The unfinished job's event, and every event of the last week.
    assert kept == [ids[0] >> 16, *(j >> 16 for j in ids[50:])]
    assert await _oldest_id(conn) == ids[50] >> 16


def test_the_event_retention_is_its_own_setting_a_week_by_default() -> None:
    policy = maintenance_policy(Env({}))
    assert policy is not None
    assert (policy.retention, policy.event_retention) == (DAY, WEEK)
    policy = maintenance_policy(Env({"RELAYQ_EVENT_RETENTION_SECONDS": "3600"}))
    assert policy is not None
    assert policy.event_retention == timedelta(hours=1)
    for bad in ("soon", "10"):
        with pytest.raises(ConfigError) as failure:
            maintenance_policy(Env({"RELAYQ_EVENT_RETENTION_SECONDS": bad}))
        assert failure.value.variable == "RELAYQ_EVENT_RETENTION_SECONDS"


async def test_maintenance_indexes_message_ids_only_where_ingest_has_left(
        conn: AsyncConnection[Any]) -> None:
    """GetEvent by message id reads an index maintenance builds on partitions ingest no
    longer writes (ingest never pays for it); the partition ingest writes is scanned."""
    await insert_jobs(conn, 3, start=10)
    assert await partitions.index_lookups(conn) == []  # ingest still writes partition 0
    await partitions.ensure(conn, upto_event_id=SIZE + 10)
    await insert_jobs(conn, 2, start=SIZE + 10)
    assert await partitions.index_lookups(conn) == ["events_p00000000_lookup"]
    assert await partitions.index_lookups(conn) == []  # built once
    cur = await conn.execute("SELECT source_key FROM sources WHERE id = 's10'")
    [(source_key,)] = await cur.fetchall()
    async with conn.transaction():
        found = await events.get_by_message(conn, source_key, "m1", None)
    assert found.event_id == 12
    # (Three rows are cheaper to scan: the plan is asked as if the partition were large.)
    await conn.execute("SET enable_seqscan = off")
    cur = await conn.execute(
        "EXPLAIN SELECT * FROM events WHERE source_key = %s AND message_id = 'm1'",
        (source_key,), prepare=False)
    plan = "\n".join(r[0] for r in await cur.fetchall())
    assert "events_p00000000_lookup" in plan
    cur = await conn.execute("SELECT source_key FROM sources WHERE id = %s", (f"s{SIZE + 10}",))
    [(newer,)] = await cur.fetchall()
    async with conn.transaction():
        assert (await events.get_by_message(conn, newer, "m0", None)).event_id == SIZE + 11


async def test_a_listing_starts_where_the_log_does(conn: AsyncConnection[Any]) -> None:
    """Once retention has dropped the old partitions the log begins far above 0: the first
    page of ListEvents starts at its first event, not in windows up from 0."""
    await partitions.ensure(conn, upto_event_id=40 * SIZE)
    await insert_jobs(conn, 3, start=40 * SIZE + 10)
    cur = await conn.execute("SELECT source_key FROM sources")
    [(source_key,)] = await cur.fetchall()
    async with conn.transaction():
        page = await events.list_events(conn, source_key, None, after=0, limit=10,
                                        include_payload=False)
    assert [r.message_id for r in page.rows] == ["m0", "m1", "m2"]
    assert page.more_after is None
