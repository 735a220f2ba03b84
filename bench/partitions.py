"""What old partitions cost maintenance, and what compacting one costs the queries beside it.

One jobs partition of --jobs jobs (~330-byte payloads, one status row each), all finished two
days ago except --unfinished failed ones, moved out of the newest partitions. It measures:

- a maintenance round (jobsdb.partitions.sweep) that only has to look at the partition, against
  reading its last change, which rounds used to do for every finished partition, every 30 s,
  until retention let it go;
- compacting it: how long, the size before and after, how long a router-like read of the
  parent table (a destination's runnable jobs, in a loop on its own connection) waited
  meanwhile, against the same read's p50 and max before, and how long a write to one of the
  partition's unfinished jobs (an attempt being recorded) waited.

    .venv/bin/python bench/partitions.py --jobs 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_source,
    create_database,
    drop_database,
    dsn_for,
    percentile,
)
from jobsdb import partitions, queue

FILL = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  attempts, retry_at, created_at, updated_at, user_id, message_id, error_code,
                  payload)
SELECT nextval('jobs_job_id_seq'), %(destination_key)s, %(tenant_key)s, %(source_key)s,
       (i %% 64)::smallint,
       CASE WHEN i %% %(every)s = 0 THEN 'failed' ELSE 'succeeded' END::job_state, 1,
       CASE WHEN i %% %(every)s = 0 THEN now() + interval '1 hour' END,
       now() - interval '2 days', now() - interval '2 days',
       'user-' || (i %% 10000), 'msg-' || i,
       CASE WHEN i %% %(every)s = 0 THEN '503' END,
       jsonb_build_object('type', 'track', 'event', 'Order Completed', 'userId',
                          'user-' || (i %% 10000), 'properties',
                          jsonb_build_object('orderId', 'order-' || i, 'total', i %% 500,
                                             'currency', 'EUR', 'note', repeat('x', 150)))
FROM generate_series(%(start)s, %(stop)s - 1) AS i
"""

STATUSES = """
INSERT INTO job_statuses (job_id, attempt, state, error_code, started_at, duration_ms, actor)
SELECT job_id, 1, state, error_code, updated_at, 3, 'router:bench' FROM jobs
"""

READ = """
SELECT job_id FROM jobs
WHERE destination_key = %(destination_key)s AND state = 'failed' AND retry_at <= now()
ORDER BY retry_at LIMIT 100
"""


def fill(name: str, jobs: int, unfinished: int) -> tuple[int, int]:
    started = time.perf_counter()
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        _, tenant_key, source_key, destinations = add_source(
            conn, "acme", "acme-web", {"acme-d": ("grpc", "127.0.0.1:9")})
        destination_key = destinations["acme-d"]
        step = 100_000
        for start in range(0, jobs, step):
            conn.execute(FILL, {"destination_key": destination_key, "tenant_key": tenant_key,
                                "source_key": source_key, "every": jobs // unfinished,
                                "start": start, "stop": min(jobs, start + step)})
        conn.execute(STATUSES)
        conn.execute("VACUUM (ANALYZE) jobs")
        conn.execute("VACUUM (ANALYZE) job_statuses")

    async def age() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            size = (await partitions.settings(c)).job_partition_size
            await partitions.ensure(c, upto_job_id=3 * size)
            await c.execute("SELECT setval('jobs_job_id_seq', %s)", (3 * size,))

    asyncio.run(age())
    print(f"filled {jobs:,} jobs ({unfinished} unfinished) in"
          f" {time.perf_counter() - started:.0f} s")
    return tenant_key, destination_key


async def reads(name: str, destination_key: int, stop: asyncio.Event, out: list[float]
                ) -> None:
    async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            await conn.execute(READ, {"destination_key": destination_key})
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.002)


async def writes(name: str, stop: asyncio.Event, out: list[float]) -> None:
    """A router recording failed attempts of one of the partition's unfinished jobs, as its
    flushes do (the same statement), each in its own transaction."""
    async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
        cur = await conn.execute("SELECT min(job_id) FROM jobs_p00000000 WHERE state = 'failed'")
        job_id = (await cur.fetchone() or [0])[0]
        attempt = 1
        while not stop.is_set():
            attempt += 1
            now = datetime.now(UTC)
            started = time.perf_counter()
            async with conn.transaction():
                await queue.record_outcomes(conn, [queue.Outcome(
                    job_id, attempt, "failed", now, 3, "503", "busy",
                    now + timedelta(hours=1))], actor="router:bench")
            out.append(time.perf_counter() - started)
            await asyncio.sleep(0.002)


async def measure(name: str, destination_key: int) -> None:
    day = timedelta(days=1)
    async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_total_relation_size('jobs_p00000000')"
                                 " + pg_total_relation_size('job_statuses_p00000000')")
        before = (await cur.fetchone() or [0])[0]

        started = time.perf_counter()
        await conn.execute("SELECT max(updated_at) FROM jobs_p00000000")
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

        stop = asyncio.Event()
        quiet: list[float] = []
        reader = asyncio.create_task(reads(name, destination_key, stop, quiet))
        await asyncio.sleep(3)
        stop.set()
        await reader
        during: list[float] = []
        written: list[float] = []
        stop = asyncio.Event()
        reader = asyncio.create_task(reads(name, destination_key, stop, during))
        writer = asyncio.create_task(writes(name, stop, written))
        await asyncio.sleep(0.5)
        await conn.execute("UPDATE job_partitions SET sparse_at = now() - interval '2 days'")
        started = time.perf_counter()
        swept = await partitions.sweep(conn, retention=day, compact_below=10_000)
        took = time.perf_counter() - started
        await asyncio.sleep(0.5)
        stop.set()
        await reader
        await writer
        assert swept.compacted == ["jobs_p00000000"], swept
        cur = await conn.execute("SELECT pg_total_relation_size('jobs_p00000000')"
                                 " + pg_total_relation_size('job_statuses_p00000000'),"
                                 " (SELECT count(*) FROM jobs)")
        after, left = await cur.fetchone() or (0, 0)
    print(f"compaction: {took:.2f} s; partition (jobs + statuses, with indexes)"
          f" {before / 1e6:,.0f} MB -> {after / 1e6:,.2f} MB; {left} jobs left")
    print(f"a destination's read of runnable jobs, alone: p50 {percentile(quiet, 0.5) * 1e3:.2f}"
          f" ms, max {max(quiet) * 1e3:.1f} ms; around the compaction: max"
          f" {max(during) * 1e3:.0f} ms ({len(during)} reads); an attempt recorded for one of"
          f" its unfinished jobs, around the compaction: max {max(written) * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--unfinished", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 50,000 jobs")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.unfinished = 50_000, 20
    name = create_database()
    try:
        _, destination_key = fill(name, args.jobs, args.unfinished)
        asyncio.run(measure(name, destination_key))
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
