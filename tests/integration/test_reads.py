"""Grouped reads: `pickup_many` answers each destination as reading it alone would, and the
router's Reader sends the reads waiting at one moment together."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import REGISTRY
from psycopg import AsyncConnection

from jobsdb import queue
from jobsdb.ingest import NewEvent, store_events
from jobsdb.pool import open_pool
from jobsdb.queue import Wanted
from router_service.reads import Reader
from tests import factories
from tests.helpers import outcome


async def _world(conn: AsyncConnection[Any], rng: random.Random, destinations: int
                 ) -> list[int]:
    """Jobs of a few users over `destinations` destinations, some failed (due or backing
    off), some parked behind those, so the reads have holders to find."""
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    keys = [await factories.destination(conn, tenant, f"d{n}") for n in range(destinations)]
    for key in keys:
        await factories.connect(conn, source.key, key)
    events = [NewEvent(source.key, tenant, f"m{i}", f"u{rng.randrange(6)}", f'{{"i": {i}}}',
                       (rng.choice(keys),))
              for i in range(40 * destinations)]
    async with conn.transaction():
        stored = await store_events(conn, events, ordering_partitions=64)
        # Rows (the row path these reads are of), as released waiters have them.
        job_ids = await factories.pending_rows(conn, [s.event_id for s in stored if s.event_id])
    failing = rng.sample(job_ids, len(job_ids) // 8)
    now = datetime.now(UTC)
    await queue.record_outcomes(conn, [
        outcome(job_id, "failed",
                retry_at=now + (timedelta(hours=1) if rng.random() < 0.5 else -timedelta(1)))
        for job_id in failing], actor="test")
    return keys


async def test_pickup_many_answers_each_destination_as_pickup_does(
        conn: AsyncConnection[Any]) -> None:
    rng = random.Random(11)
    keys = await _world(conn, rng, 6)
    holders = 0
    for _ in range(30):
        cur = await conn.execute("SELECT job_id FROM jobs ORDER BY job_id")
        every = [row[0] for row in await cur.fetchall()]
        partitions = (None if rng.random() < 0.3
                      else sorted(rng.sample(range(64), rng.randrange(1, 64))))
        wanted = [Wanted(key, rng.randrange(1, 30))
                  for key in rng.sample(keys, rng.randrange(1, len(keys) + 1))]
        exclude = rng.sample(every, rng.randrange(0, 60))
        grouped = await queue.pickup_many(conn, wanted, partitions=partitions, exclude=exclude)
        assert set(grouped) == {w.destination_key for w in wanted}
        for w in wanted:
            alone = await queue.pickup(conn, destination_key=w.destination_key, limit=w.limit,
                                       partitions=partitions, exclude=exclude)
            assert grouped[w.destination_key] == alone
            holders += sum(c.held_by is not None for c in alone)
            # What a reference reading of the table says, independently of the statement.
            assert [c.job_id for c in alone] == await _reference(
                conn, w.destination_key, w.limit, partitions, exclude)
    assert holders > 0


async def _reference(conn: AsyncConnection[Any], destination_key: int, limit: int,
                     partitions: list[int] | None, exclude: list[int]) -> list[int]:
    """The rule, the plain way: the first `limit` pending jobs by job id and the first `limit`
    due failed ones by retry time, together in job order, cut to `limit`."""
    runnable = []
    for state, order in (("pending", "job_id"), ("failed", "retry_at")):
        cur = await conn.execute(
            f"SELECT job_id FROM jobs WHERE destination_key = %s AND state = '{state}'"
            " AND (state = 'pending' OR retry_at <= now())"
            " AND (%s::smallint[] IS NULL OR ordering_partition = ANY(%s::smallint[]))"
            f" AND NOT job_id = ANY(%s::bigint[]) ORDER BY {order} LIMIT %s",
            (destination_key, partitions, partitions, exclude, limit))
        runnable += [row[0] for row in await cur.fetchall()]
    return sorted(runnable)[:limit]


@asynccontextmanager
async def reader_on(database: str, *, max_rows: int) -> AsyncIterator[Reader]:
    """A running Reader with one worker, reading for lanes that hold 10 jobs or fewer."""
    pool = await open_pool(database, application_name="test-reads", max_size=2)
    reader = Reader(pool, alone_above=10, max_rows=max_rows, concurrency=1)
    reader.start()
    try:
        yield reader
    finally:
        await reader.close()
        await pool.close()


EVERYTHING = frozenset(range(64))


def _statements(kind: str) -> float:
    return REGISTRY.get_sample_value("relayq_router_pickup_statements_total",
                                     {"kind": kind}) or 0.0


async def test_reads_waiting_together_go_in_one_statement(
        conn: AsyncConnection[Any], database: str) -> None:
    keys = await _world(conn, random.Random(5), 40)
    await conn.commit()
    async with reader_on(database, max_rows=10_000) as reader:
        grouped_before, alone_before = _statements("grouped"), _statements("alone")
        reads = await asyncio.gather(*(reader.pickup(key, 500, EVERYTHING, ()) for key in keys))
        # All 40 are waiting by the time the worker wakes: one statement reads for all.
        assert _statements("grouped") - grouped_before == 1
        for key, read in zip(keys, reads, strict=True):
            # Capped at alone_above: a full grouped read is not the whole queue.
            expected = await queue.pickup(conn, destination_key=key, limit=10)
            assert read.candidates == expected
            assert read.complete is (len(expected) < 10)

        # A lane that holds more than alone_above jobs reads by itself, with its own limit.
        held = [c.job_id for c in reads[0].candidates] + [-1]
        alone = await reader.pickup(keys[0], 500, EVERYTHING, held)
        assert _statements("alone") - alone_before == 1
        assert alone.candidates == await queue.pickup(conn, destination_key=keys[0], limit=500,
                                                      exclude=held)
        assert alone.complete


async def test_grouped_reads_keep_each_lanes_exclusions_and_partitions(
        conn: AsyncConnection[Any], database: str) -> None:
    keys = await _world(conn, random.Random(6), 12)
    await conn.commit()
    # Each lane holds (excludes) the first two jobs it would read.
    held = {key: [c.job_id for c in await queue.pickup(conn, destination_key=key, limit=2)]
            for key in keys}
    async with reader_on(database, max_rows=30) as reader:
        # A lane closed while its read waits: that read is dropped, and its successor (the
        # same destination) gets only its own answer.
        gone = asyncio.create_task(reader.pickup(keys[0], 10, EVERYTHING, held[keys[0]]))
        await asyncio.sleep(0)
        gone.cancel()
        before = _statements("grouped")
        reads = await asyncio.gather(*(reader.pickup(key, 10, EVERYTHING, held[key])
                                       for key in keys))
        # Ten rows each, thirty a statement: 12 reads in 4 statements, none for the closed one.
        assert _statements("grouped") - before == 4
        for key, read in zip(keys, reads, strict=True):
            assert read.candidates == await queue.pickup(
                conn, destination_key=key, limit=10, exclude=held[key])

        # Reads made with different partitions (a lease just changed hands) never share one.
        evens, odds = frozenset(range(0, 64, 2)), frozenset(range(1, 64, 2))
        chosen = [evens if n % 2 == 0 else odds for n in range(len(keys))]
        before = _statements("grouped")
        reads = await asyncio.gather(*(reader.pickup(key, 10, partitions, ())
                                       for key, partitions in zip(keys, chosen, strict=True)))
        assert _statements("grouped") - before == 4
        for key, partitions, read in zip(keys, chosen, reads, strict=True):
            assert read.candidates == await queue.pickup(
                conn, destination_key=key, limit=10, partitions=sorted(partitions))
            assert {c.ordering_partition for c in read.candidates} <= partitions
