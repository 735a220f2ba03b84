"""GetEvent over a large event log: by event id and by (source, message id).

One source with --events events (10 million by default) in the log, written straight into
the log tables with generate_series, as if ingested over the past days: ~180-byte documents,
10,000 users, ids from half a partition on so that the last partition is half full and still
the one ingest writes (partitions of 1,000,000 ids, the default). Five destinations are
connected: `ok` delivered everything up to the frontier (a `deliveries` row per 1,000 events,
10 requests each), `flaky` too but for every 10,000th event, which failed (a job row, one
attempt), `picky` has a filter, `paused` has read nothing (its own cursors at the start), and
`late` was connected after every event; the last 5% of the log is above the frontier (pending
everywhere). Maintenance's message-id indexes are built as maintenance builds them
(jobsdb.partitions.index_lookups: every partition ingest has left), timed.

Then relayq-admin runs as its own process, and GetEvent is called over gRPC, one call at a
time, for events drawn at random: by event id, by message id in partitions ingest has left
(indexed), and by message id in the partition ingest is writing (scanned). Each answer holds
the event and its standing at the five destinations (jobsdb.standing.job_status for each).

    .venv/bin/python bench/events.py --events 10000000 --calls 500
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_source,
    create_database,
    drop_database,
    dsn_for,
    free_port,
    percentile,
    spawn,
    wait_ready,
)
from jobsdb import partitions
from relayq.v1 import admin_pb2, admin_pb2_grpc

TOKEN = "bench-operator-token-0123456789"
USERS = 10_000

EVENTS = """
INSERT INTO events (event_id, created_at, source_key, tenant_key, ordering_partition, user_id,
                    message_id, document)
SELECT i, now() - (%(last)s - i) * interval '20 ms', %(source_key)s, %(tenant_key)s,
       ordering_partition_of('user-' || (i %% %(users)s), 64), 'user-' || (i %% %(users)s),
       'msg-' || i,
       '{"type":"track","event":"Order Completed","userId":"user-' || (i %% %(users)s)
       || '","messageId":"msg-' || i || '","properties":{"orderId":"order-' || i
       || '","total":' || (i %% 500) || ',"currency":"EUR"}}'
FROM generate_series(%(start)s, %(stop)s - 1) AS i
"""

# A deliveries row per 1,000 events of a destination, 10 requests of 100: what routers write.
# `skip` leaves out every skip-th event (0: none), the ones that failed there.
DELIVERIES = """
INSERT INTO deliveries (destination_key, first_event_id, last_event_id, recorded_at, actor,
                        event_ids, partitions, requests, started_at, duration_ms, status, batch)
SELECT %(destination_key)s, x.ids[1], x.ids[cardinality(x.ids)], now(), 'router:bench',
       x.ids, x.parts, x.reqs, array_fill(now(), ARRAY[10]), array_fill(3, ARRAY[10]),
       array_fill('200'::text, ARRAY[10]), array_fill(''::text, ARRAY[10])
FROM generate_series(%(start)s / 1000, (%(stop)s - 1) / 1000) AS b
CROSS JOIN LATERAL (
    SELECT array_agg(i ORDER BY i) AS ids,
           array_agg(ordering_partition_of('user-' || (i %% %(users)s), 64) ORDER BY i) AS parts,
           array_agg((i %% 1000) / 100 + 1 ORDER BY i) AS reqs
    FROM generate_series(greatest(b * 1000, %(start)s), least(b * 1000 + 999, %(stop)s - 1)) i
    WHERE %(skip)s = 0 OR i %% %(skip)s <> 0
) x
WHERE x.ids IS NOT NULL
"""

FAILED = """
WITH made AS (
    INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition,
                      state, attempts, retry_at, first_attempt_at, created_at, updated_at,
                      user_id, message_id, error_code)
    SELECT (e.event_id << 16) | %(slot)s, %(destination_key)s, e.tenant_key, e.source_key,
           e.ordering_partition, 'failed', 1, now() + interval '1 hour', e.created_at,
           e.created_at, e.created_at, e.user_id, e.message_id, '503'
    FROM events e
    WHERE e.event_id = ANY(%(ids)s::bigint[])
    RETURNING job_id, updated_at
)
INSERT INTO job_statuses (job_id, attempt, state, error_code, response, started_at,
                          duration_ms, retry_at, actor)
SELECT job_id, 1, 'failed', '503', 'down for maintenance', updated_at, 3,
       now() + interval '1 hour', 'router:bench'
FROM made
"""


RESIZE = """
DO $$
DECLARE
    child regclass;
BEGIN
    FOR child IN SELECT i.inhrelid::regclass FROM pg_inherits i
                 WHERE i.inhparent IN ('events'::regclass, 'deliveries'::regclass,
                                       'jobs'::regclass, 'job_statuses'::regclass) LOOP
        EXECUTE format('DROP TABLE %s', child);
    END LOOP;
END
$$
"""


def fill(name: str, count: int, size: int) -> int:
    """The log, its deliveries, rows and cursors; the message-id indexes. Returns the first
    event id."""
    started = time.perf_counter()
    start = size // 2 + 1
    last = start + count - 1  # the last partition is half full: ingest's
    frontier = last - count // 20
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        # A fresh database: its (empty) partitions go, to be made again at this size.
        conn.execute(RESIZE)
        conn.execute("UPDATE relayq_settings SET value = %s WHERE name = 'event_partition_size'",
                     (str(size),))
        _, tenant_key, source_key, keys = add_source(
            conn, "acme", "web", {d: ("grpc", "127.0.0.1:9")
                                  for d in ("ok", "flaky", "picky", "paused", "late")})
        conn.execute("UPDATE connections SET created_at = now() - interval '90 days'"
                     " WHERE destination_key <> %s", (keys["late"],))
        conn.execute("UPDATE connections SET event_filter = 'properties.total > 250'"
                     " WHERE destination_key = %s", (keys["picky"],))
        conn.execute("UPDATE destinations SET paused = true WHERE destination_key = %s",
                     (keys["paused"],))

    async def make_partitions() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            for number in range(start // size, last // size + 1):
                await partitions.ensure(c, upto_event_id=number * size)

    asyncio.run(make_partitions())
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        keys_of = {"source_key": source_key, "tenant_key": tenant_key, "users": USERS,
                   "last": last}
        low = start
        while low <= last:  # a statement per partition
            high = min(last + 1, (low // size + 1) * size)
            conn.execute(EVENTS, {**keys_of, "start": low, "stop": high})
            for destination, skip in (("ok", 0), ("flaky", 10_000)):
                if low <= frontier:
                    conn.execute(DELIVERIES, {
                        "destination_key": keys[destination], "skip": skip, "users": USERS,
                        "start": low, "stop": min(high, frontier + 1)})
            print(f"  events {low:,}..{high - 1:,} written"
                  f" ({time.perf_counter() - started:.0f} s)", flush=True)
            low = high
        conn.execute("SELECT setval('events_event_id_seq', %s)", (last,))
        slots = dict(conn.execute("SELECT destination_key, slot FROM connections").fetchall())
        conn.execute(FAILED, {"destination_key": keys["flaky"], "slot": slots[keys["flaky"]],
                              "ids": list(range(10_000, frontier + 1, 10_000))})
        conn.execute("UPDATE router_leases SET frontier = %s", (frontier,))
        conn.execute("INSERT INTO destination_cursors (destination_key, partition, position)"
                     " SELECT %s, partition, %s FROM router_leases", (keys["paused"], start - 1))
        conn.execute("VACUUM ANALYZE")
    print(f"filled {count:,} events in {time.perf_counter() - started:.0f} s")

    async def index() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            began = time.perf_counter()
            built = await partitions.index_lookups(c, at_most=1000)
            took = time.perf_counter() - began
            print(f"maintenance built {len(built)} message-id indexes in {took:.1f} s"
                  f" ({took / max(len(built), 1):.1f} s a partition)")
            cur = await c.execute("SELECT pg_size_pretty(sum(pg_relation_size(i.oid)))"
                                  " FROM pg_class i WHERE i.relname LIKE 'events\\_p%\\_lookup'")
            print(f"  their size: {(await cur.fetchone() or ['?'])[0]}")

    asyncio.run(index())
    return start


def measure(port: int, start: int, count: int, size: int, calls: int) -> None:
    last = start + count - 1
    current = last // size * size  # the partition ingest writes begins here
    rng = random.Random(18)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)

        def timed(what: str, request: Callable[[], admin_pb2.GetEventRequest]) -> None:
            for _ in range(10):  # warm: connections of the pool, plans, caches
                stub.GetEvent(request(), metadata=metadata, timeout=60)
            took: list[float] = []
            for _ in range(calls):
                asked = request()
                began = time.perf_counter()
                answer = stub.GetEvent(asked, metadata=metadata, timeout=60)
                took.append(time.perf_counter() - began)
                assert len(answer.destinations) == 5, answer
            print(f"GetEvent {what}: p50 {percentile(took, 0.5) * 1e3:.1f} ms,"
                  f" p99 {percentile(took, 0.99) * 1e3:.1f} ms, max {max(took) * 1e3:.1f} ms"
                  f" ({calls} calls)")

        timed("by event id", lambda: admin_pb2.GetEventRequest(
            event_id=rng.randint(start, last)))
        timed("by message id, partitions ingest has left (indexed)",
              lambda: admin_pb2.GetEventRequest(
                  source_id="web", message_id=f"msg-{rng.randint(start, current - 1)}"))
        timed(f"by message id, the partition ingest writes ({last - current + 1:,} events,"
              " scanned)", lambda: admin_pb2.GetEventRequest(
                  source_id="web", message_id=f"msg-{rng.randint(current, last)}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--partition-size", type=int, default=1_000_000,
                        help="event ids per partition (relayq_settings)")
    parser.add_argument("--calls", type=int, default=300, help="timed calls of each kind")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--database", metavar="NAME",
                        help="measure a database a run with --keep filled (kept again)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: 60,000 events in partitions of 20,000, 20 calls")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.partition_size, args.calls = 60_000, 20_000, 20
    if args.database:
        name, args.keep = args.database, True
        with psycopg.connect(dsn_for(name)) as conn:
            row = conn.execute("SELECT min(event_id), max(event_id), (SELECT value::integer"
                               " FROM relayq_settings WHERE name = 'event_partition_size')"
                               " FROM events").fetchone()
            assert row is not None
            start, args.events, args.partition_size = row[0], row[1] - row[0] + 1, row[2]
    else:
        name = create_database()
    admin = None
    try:
        if not args.database:
            start = fill(name, args.events, args.partition_size)
        port = free_port()
        admin = spawn("admin_service.main", {
            "RELAYQ_DATABASE_URL": dsn_for(name), "RELAYQ_ADMIN_TOKEN": TOKEN,
            "RELAYQ_ADMIN_ADDRESS": f"127.0.0.1:{port}", "RELAYQ_ADMIN_METRICS_ADDRESS": "off",
            "RELAYQ_ADMIN_CONSOLE_ADDRESS": "off"})
        wait_ready(port)
        measure(port, start, args.events, args.partition_size, args.calls)
    finally:
        if admin is not None:
            admin.terminate()
            admin.wait(30)
        if args.keep:
            print(f"kept database {name}")
        else:
            drop_database(name)


if __name__ == "__main__":
    main()
