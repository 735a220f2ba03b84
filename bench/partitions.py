"""What old partitions cost maintenance, and what compacting one costs the queries beside it.

One partition group of the event log (events, deliveries, jobs and job_statuses, numbered
alike: jobsdb/partitions.py): --jobs events of one source with one destination (one job
each), ~330-byte documents, all read, delivered and recorded two days ago (a `deliveries`
row per flush of 1,000 events, 100 per request), except --unfinished failed ones, which have
rows (one status each) and keep retrying; every router's frontier is past the partition,
which is no longer among the newest. It measures:

- a maintenance round (jobsdb.partitions.sweep) that only has to look at the partition, against
  reading its last change (the newest event, job row change and delivery), which rounds used
  to do for every finished partition, every 30 s, until retention let it go;
- compacting it: how long, the size before and after (the four tables, with indexes), how
  long two router-like reads of the parent tables, each in a loop on its own connection,
  waited meanwhile against their p50 and max before: the read of the log by a router that
  has caught up (every ordering partition after its last event, jobsdb.eventlog.read) and a
  destination's runnable job rows (its failed jobs due); and how long two router writes
  waited: an attempt recorded for one of the partition's unfinished jobs (the row path,
  jobsdb.queue.record_outcomes) and a delivery from the head of the log recorded with its
  frontier moved (the log path, jobsdb.eventlog.record_deliveries and move_frontiers).

    .venv/bin/python bench/partitions.py --jobs 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_source,
    create_database,
    drop_database,
    dsn_for,
    percentile,
)
from jobsdb import eventlog, partitions, queue
from jobsdb.sqlfile import query

Conn = psycopg.AsyncConnection[Any]
# One timed step of a loop: a read or a write, on the loop's own connection.
Step = Callable[[Conn], Awaitable[object]]

OWNER = "bench"
# Events delivered at the head of the log while the old partition is compacted.
HEAD = 5000

EVENTS = """
INSERT INTO events (event_id, created_at, source_key, tenant_key, ordering_partition, user_id,
                    message_id, document)
SELECT i, now() - %(age)s::interval, %(source_key)s, %(tenant_key)s,
       ordering_partition_of('user-' || (i %% 10000), 64), 'user-' || (i %% 10000), 'msg-' || i,
       jsonb_build_object('type', 'track', 'event', 'Order Completed', 'userId',
                          'user-' || (i %% 10000), 'properties',
                          jsonb_build_object('orderId', 'order-' || i, 'total', i %% 500,
                                             'currency', 'EUR', 'note', repeat('x', 150)))::text
FROM generate_series(%(start)s, %(stop)s - 1) AS i
"""

# The unfinished jobs: a row each (failed, retrying in an hour) and their first attempt.
FAILED = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  attempts, retry_at, first_attempt_at, created_at, updated_at, user_id,
                  message_id, error_code)
SELECT (e.event_id << 16) | c.slot, c.destination_key, e.tenant_key, e.source_key,
       e.ordering_partition, 'failed', 1, now() + interval '1 hour', e.created_at,
       e.created_at, e.created_at, e.user_id, e.message_id, '503'
FROM events e
JOIN connections c ON c.source_key = e.source_key
WHERE e.event_id %% %(every)s = 0 AND e.event_id <= %(jobs)s
"""

STATUSES = """
INSERT INTO job_statuses (job_id, attempt, state, error_code, started_at, duration_ms, retry_at,
                          actor, recorded_at)
SELECT job_id, 1, state, error_code, updated_at, 3, retry_at, 'router:bench', updated_at
FROM jobs
"""

# Everything else was delivered: a deliveries row per flush of 1,000 events, 100 a request.
DELIVERIES = """
INSERT INTO deliveries (destination_key, first_event_id, last_event_id, recorded_at, actor,
                        event_ids, partitions, requests, started_at, duration_ms, status, batch)
SELECT c.destination_key, min(e.event_id), max(e.event_id), now() - interval '2 days',
       'router:bench', array_agg(e.event_id ORDER BY e.event_id),
       array_agg(e.ordering_partition ORDER BY e.event_id),
       array_agg(e.event_id %% 1000 / 100 + 1 ORDER BY e.event_id),
       array_fill(now() - interval '2 days', ARRAY[10]), array_fill(3, ARRAY[10]),
       array_fill('ok'::text, ARRAY[10]), array_fill(''::text, ARRAY[10])
FROM events e
JOIN connections c ON c.source_key = e.source_key
WHERE e.event_id %% %(every)s <> 0
  AND e.event_id >= %(start)s AND e.event_id < %(stop)s
GROUP BY c.destination_key, e.event_id / 1000
"""

READ_ROWS = """
SELECT job_id FROM jobs
WHERE destination_key = %(destination_key)s AND state = 'failed' AND retry_at <= now()
ORDER BY retry_at LIMIT 100
"""

GROUP_0 = [partitions.partition_name(table, 0) for table in partitions.TABLES]
NAMES_0 = {"events": sql.Identifier("events_p00000000"),
           "deliveries": sql.Identifier("deliveries_p00000000"),
           "jobs": sql.Identifier("jobs_p00000000"),
           "statuses": sql.Identifier("job_statuses_p00000000")}


def fill(name: str, jobs: int, unfinished: int) -> tuple[int, int, int]:
    """The old partition (event ids 1 to --jobs) and HEAD events at the head of the log,
    read up to the head's start; returns (tenant, source, destination)."""
    started = time.perf_counter()

    async def make_partitions() -> int:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            size = (await partitions.settings(c)).event_partition_size
            await partitions.ensure(c, upto_event_id=3 * size)
            return size

    size = asyncio.run(make_partitions())
    if jobs >= size:
        raise SystemExit(f"--jobs must be below the partition size ({size:,})")
    every = jobs // unfinished
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        _, tenant_key, source_key, destinations = add_source(
            conn, "acme", "acme-web", {"acme-d": ("grpc", "127.0.0.1:9")})
        keys = {"source_key": source_key, "tenant_key": tenant_key, "every": every,
                "jobs": jobs, "age": "2 days"}
        step = 100_000
        for start in range(1, jobs + 1, step):
            stop = min(jobs + 1, start + step)
            conn.execute(EVENTS, {**keys, "start": start, "stop": stop})
            conn.execute(DELIVERIES, {**keys, "start": start, "stop": stop})
        unfinished = conn.execute(FAILED, keys).rowcount
        conn.execute(STATUSES)
        # The head: events after the old partition's, not read yet (the sequence where they
        # end, every frontier where they begin: past partition 0).
        head = 3 * size
        conn.execute(EVENTS, {**keys, "start": head + 1, "stop": head + 1 + HEAD, "age": "0"})
        conn.execute("SELECT setval('events_event_id_seq', %s)", (head + HEAD,))
        conn.execute("UPDATE router_leases SET frontier = %s, owner = %s,"
                     " expires_at = now() + interval '1 hour'", (head, OWNER))
        for table in ("events", "deliveries", "jobs", "job_statuses"):
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
    print(f"filled {jobs:,} events ({unfinished} jobs unfinished) in"
          f" {time.perf_counter() - started:.0f} s")
    return tenant_key, source_key, destinations["acme-d"]


async def loop(name: str, stop: asyncio.Event, out: list[float], step: Step) -> None:
    """`step` on its own connection, timed, every 2 ms until `stop`."""
    async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            await step(conn)
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.002)


async def read_log(conn: Conn) -> Step:
    """A caught-up router's pass over the log: every ordering partition read after the last
    event it holds (one index probe each, nothing new), as it polls between wake-ups."""
    cur = await conn.execute("SELECT l.partition, greatest(l.frontier, max(e.event_id))"
                             " FROM router_leases l LEFT JOIN events e"
                             " ON e.ordering_partition = l.partition AND e.event_id > l.frontier"
                             " GROUP BY l.partition, l.frontier")
    wanted = [eventlog.Wanted(p, after, 100) for p, after in await cur.fetchall()]

    async def step(conn: Conn) -> object:
        async with conn.transaction(), conn.pipeline():
            return await eventlog.read(conn, wanted)

    return step


def read_rows(destination_key: int) -> Step:
    """A destination's runnable job rows (its failed jobs due)."""

    async def step(conn: Conn) -> object:
        return await conn.execute(READ_ROWS, {"destination_key": destination_key})

    return step


async def retry_one(conn: Conn) -> Step:
    """A router recording failed attempts of one of the partition's unfinished jobs, as its
    flushes do (the same statement, fenced), each in its own transaction."""
    cur = await conn.execute("SELECT min(job_id) FROM jobs_p00000000 WHERE state = 'failed'")
    job_id = (await cur.fetchone() or [0])[0]
    attempt = 1

    async def step(conn: Conn) -> object:
        nonlocal attempt
        attempt += 1
        now = datetime.now(UTC)
        async with conn.transaction():
            return await queue.record_outcomes(conn, [queue.Outcome(
                job_id, attempt, "failed", now, 3, "503", "busy",
                now + timedelta(hours=1))], actor="router:bench", owner=OWNER)

    return step


async def deliver_head(conn: Conn, destination_key: int) -> Step:
    """A router recording what it delivered from the head of the log, one event a flush (a
    deliveries row, fenced), and moving that partition's frontier past it, as its flushes
    and its reader do."""
    cur = await conn.execute("SELECT event_id, ordering_partition FROM events"
                             " WHERE event_id > (SELECT min(frontier) FROM router_leases)"
                             " ORDER BY event_id")
    head = iter(await cur.fetchall())

    async def step(conn: Conn) -> object:
        following = next(head, None)
        if following is None:
            return None  # all of the head recorded: nothing left to write
        event_id, partition = following
        now = datetime.now(UTC)
        async with conn.transaction():
            await eventlog.record_deliveries(conn, [eventlog.Delivered(
                destination_key, [event_id], [partition], [1],
                [eventlog.Request(now, 3, "ok", "")])], owner=OWNER, actor="router:bench")
        async with conn.transaction():
            return await eventlog.move_frontiers(conn, {partition: event_id}, owner=OWNER)

    return step


async def measure(name: str, destination_key: int) -> None:
    day = timedelta(days=1)
    size_query = sql.SQL("SELECT sum(pg_total_relation_size(t))::bigint"
                         " FROM unnest(%s::regclass[]) AS t")
    async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
        cur = await conn.execute(size_query, (GROUP_0,))
        before = (await cur.fetchone() or [0])[0]

        started = time.perf_counter()
        await conn.execute(sql.SQL(query("partitions.sql", "last_change")).format(**NAMES_0))
        scan = time.perf_counter() - started
        await partitions.sweep(conn, retention=day, compact_below=10_000)  # notes it sparse
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            await partitions.sweep(conn, retention=day, compact_below=10_000)
            rounds.append(time.perf_counter() - started)
        print(f"a maintenance round on the old partition: p50 {percentile(rounds, 0.5) * 1e3:.1f}"
              f" ms; reading its last change (what every round did for each finished"
              f" partition until it went): {scan * 1e3:.0f} ms")

        reads = {"log": await read_log(conn), "rows": read_rows(destination_key)}
        writes = {"row": await retry_one(conn), "log": await deliver_head(conn, destination_key)}
        stop = asyncio.Event()
        quiet: dict[str, list[float]] = {kind: [] for kind in reads}
        tasks = [asyncio.create_task(loop(name, stop, quiet[kind], step))
                 for kind, step in reads.items()]
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*tasks)
        during: dict[str, list[float]] = {kind: [] for kind in reads}
        written: dict[str, list[float]] = {kind: [] for kind in writes}
        stop = asyncio.Event()
        tasks = [asyncio.create_task(loop(name, stop, during[kind], step))
                 for kind, step in reads.items()]
        tasks += [asyncio.create_task(loop(name, stop, written[kind], step))
                  for kind, step in writes.items()]
        await asyncio.sleep(0.5)
        await conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
        started = time.perf_counter()
        swept = await partitions.sweep(conn, retention=day, compact_below=10_000)
        took = time.perf_counter() - started
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert swept.compacted == ["events_p00000000"], swept
        cur = await conn.execute(sql.SQL("SELECT ({}), (SELECT count(*) FROM jobs_p00000000),"
                                         " (SELECT count(*) FROM events_p00000000)"
                                         ).format(size_query), (GROUP_0,))
        after, left, events_left = await cur.fetchone() or (0, 0, 0)
    print(f"compaction: {took:.2f} s; partition (events, deliveries, jobs, statuses, with"
          f" indexes) {before / 1e6:,.0f} MB -> {after / 1e6:,.2f} MB; {left} jobs and"
          f" {events_left} events left")
    for kind, label in (("log", "a router's read of the log (64 partitions, caught up)"),
                        ("rows", "a destination's read of runnable job rows")):
        print(f"{label}, alone: p50 {percentile(quiet[kind], 0.5) * 1e3:.2f} ms, max"
              f" {max(quiet[kind]) * 1e3:.1f} ms; around the compaction: max"
              f" {max(during[kind]) * 1e3:.0f} ms ({len(during[kind])} reads)")
    print(f"around the compaction: an attempt recorded for one of its unfinished jobs (row"
          f" path): max {max(written['row']) * 1e3:.0f} ms ({len(written['row'])} writes);"
          f" a delivery from the head recorded and its frontier moved (log path): max"
          f" {max(written['log']) * 1e3:.0f} ms ({len(written['log'])} writes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=999_999,
                        help="events in the old partition, one job each (below the"
                             " partition size, 1,000,000 by default)")
    parser.add_argument("--unfinished", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 50,000 jobs")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.unfinished = 50_000, 20
    name = create_database()
    try:
        _, _, destination_key = fill(name, args.jobs, args.unfinished)
        asyncio.run(measure(name, destination_key))
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
