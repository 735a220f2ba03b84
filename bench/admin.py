"""Admin latency over a big event log: ListJobs, GetJob, PeekJobs, GetStats and dry runs.

    .venv/bin/python bench/admin.py [--events 1000000] [--calls 200]

Fills a fresh database as a busy cluster leaves the event log (jobsdb/migrations/0012): 5
sources of two tenants (acme-web, -ios, -android, -server, beta-web), each connected to 10
gRPC destinations (acme-d0..39, beta-d0..9), so an event is 10 jobs; 10,000 users (one per
100 events in smaller logs), each always on one source; ~330-byte documents, created over
the last day. Most jobs have no row:

- every ordering partition's frontier (router_leases) is at the last 0.8% of the log: the
  jobs below it were delivered (a `deliveries` row per destination and flush of 1,000 of its
  events, 100 to a request), the events above it are pending (80,000 jobs at 1,000,000
  events), the first eighth of them already delivered and recorded but the frontier not
  moved yet, as a router leaves them between a flush and its next read;
- jobs that need a row have one, as routers and operators write them: in the last 1.5% of the
  log before the frontier, 10% of (destination, user) pairs are stuck (their first job there
  failed, 1-5 attempts, retrying in 10 minutes; their later ones wait behind it), and in
  the history before, 0.05% of jobs were aborted after 5 attempts and 0.05% succeeded on
  their second (at 1,000,000 events: 10,000 failed, 5,000 waiting, 5,000 aborted rows, as the
  benchmark's jobs table had before the event log, over ten times as many jobs);
- job_statuses hold the rows' attempts, delivery_counts the totals GetStats reads.

It vacuums everything as autovacuum would, starts relayq-admin as its own process, and times
each call from a gRPC client: median and p99 over --calls calls (fewer for a call that takes
long: at most --seconds of calls each, at least 3), after up to 10 warm-up calls (at most a
quarter of --seconds of them). The service's connections prepare a statement on its sixth
use and Postgres may then plan it generically from the eleventh: a call measured fewer times
than that has been timed with plans made for its values only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SAMPLE_DOCUMENT,
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
SOURCES = [("acme", "acme-web"), ("acme", "acme-ios"), ("acme", "acme-android"),
           ("acme", "acme-server"), ("beta", "beta-web")]
FANOUT = 10
# Of the log's events: above every frontier (pending), and the stretch before the frontier
# where (destination, user) pairs are stuck behind a failed job.
PENDING = 0.008
RECENT = 0.015
# Of the pending events: the first ones, delivered and recorded, the frontier not moved yet.
RECORDED_AHEAD = 1 / 8

# An event's source follows its user (i mod 5); its time runs over the last day. Its kind
# (i / 5 mod 5) and, for a failed job, its attempts (i / 25 mod 5) vary within a source.
EVENTS = f"""
INSERT INTO events (event_id, created_at, source_key, tenant_key, ordering_partition, user_id,
                    message_id, document)
SELECT i, now() - interval '1 day' + i * %(spacing)s * interval '1 millisecond',
       (%(source_keys)s::integer[])[1 + i %% %(users)s %% 5],
       (%(tenant_keys)s::integer[])[1 + i %% %(users)s %% 5],
       ordering_partition_of('user-' || (i %% %(users)s), 64), 'user-' || (i %% %(users)s),
       'msg-' || i,
       {SAMPLE_DOCUMENT}
FROM generate_series(%(start)s, %(stop)s - 1) AS i
"""

# Every job of the recent stretch at a stuck (destination, user) pair: the pair's first
# failed, the rest waiting behind it.
STUCK = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  attempts, blocked_by, retry_at, first_attempt_at, created_at, updated_at,
                  user_id, message_id, error_code)
SELECT job_id, destination_key, tenant_key, source_key, ordering_partition,
       CASE WHEN n = 1 THEN 'failed' ELSE 'waiting' END::job_state,
       CASE WHEN n = 1 THEN 1 + event_id / 25 %% 5 ELSE 0 END,
       CASE WHEN n > 1 THEN root END,
       CASE WHEN n = 1 THEN now() + interval '10 minutes' END,
       CASE WHEN n = 1 THEN created_at END, created_at, created_at, user_id, message_id,
       CASE WHEN n = 1 THEN '503' END
FROM (
    SELECT (e.event_id << 16) | c.slot AS job_id, e.event_id, c.destination_key, e.tenant_key,
           e.source_key, e.ordering_partition, e.created_at, e.user_id, e.message_id,
           row_number() OVER pair AS n, first_value((e.event_id << 16) | c.slot) OVER pair AS root
    FROM events e
    JOIN connections c ON c.source_key = e.source_key
    WHERE e.event_id > %(recent)s AND e.event_id <= %(frontier)s
      AND abs(hashtext(e.user_id || '/' || c.destination_key)) %% 10 = 0
    WINDOW pair AS (PARTITION BY c.destination_key, e.user_id ORDER BY e.event_id)
) stuck
"""

# History: jobs aborted after 5 attempts, and jobs that succeeded on their second.
SETTLED_ROWS = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  attempts, first_attempt_at, created_at, updated_at, user_id, message_id,
                  error_code)
SELECT job_id, destination_key, tenant_key, source_key, ordering_partition,
       CASE WHEN class = 0 THEN 'aborted' ELSE 'succeeded' END::job_state,
       CASE WHEN class = 0 THEN 5 ELSE 2 END, created_at, created_at,
       created_at + interval '1 minute', user_id, message_id,
       CASE WHEN class = 0 THEN '503' END
FROM (
    SELECT (e.event_id << 16) | c.slot AS job_id, c.destination_key, e.tenant_key, e.source_key,
           e.ordering_partition, e.created_at, e.user_id, e.message_id,
           abs(hashtext(((e.event_id << 16) | c.slot)::text)) %% 2000 AS class
    FROM events e
    JOIN connections c ON c.source_key = e.source_key
    WHERE e.event_id >= %(start)s AND e.event_id < %(stop)s
) history
WHERE class < 2
"""

# Each row's attempts (a waiting row has none: it was parked, never sent).
STATUSES = """
INSERT INTO job_statuses (job_id, attempt, state, error_code, started_at, duration_ms, retry_at,
                          actor, recorded_at)
SELECT j.job_id, a, CASE WHEN a = j.attempts THEN j.state ELSE 'failed' END,
       CASE WHEN a < j.attempts OR j.state <> 'succeeded' THEN '503' END,
       j.created_at + (a - 1) * interval '10 seconds', 12,
       CASE WHEN a < j.attempts OR j.state = 'failed'
            THEN j.created_at + a * interval '10 seconds' END,
       'router:bench', j.created_at + (a - 1) * interval '10 seconds'
FROM jobs j
CROSS JOIN LATERAL generate_series(1, j.attempts) AS a
"""

# What routers delivered from the log: one row per destination and flush of 1,000 of its
# source's events (5,000 ids: flushes never straddle a partition), 100 to a request.
DELIVERIES = """
INSERT INTO deliveries (destination_key, first_event_id, last_event_id, recorded_at, actor,
                        event_ids, partitions, requests, started_at, duration_ms, status, batch)
SELECT c.destination_key, min(e.event_id), max(e.event_id),
       max(e.created_at) + interval '1 second', 'router:bench',
       array_agg(e.event_id ORDER BY e.event_id),
       array_agg(e.ordering_partition ORDER BY e.event_id),
       array_agg(e.event_id %% 5000 / 500 + 1 ORDER BY e.event_id),
       array_fill(max(e.created_at) + interval '0.5 second', ARRAY[10]),
       array_fill(4, ARRAY[10]), array_fill('ok'::text, ARRAY[10]),
       array_fill(''::text, ARRAY[10])
FROM events e
JOIN connections c ON c.source_key = e.source_key
WHERE e.event_id >= %(start)s AND e.event_id < %(stop)s
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = (e.event_id << 16) | c.slot)
GROUP BY c.destination_key, e.event_id / 5000
"""

COUNTS = """
INSERT INTO delivery_counts (destination_key, bucket, succeeded, failed, aborted)
SELECT d.destination_key, '-infinity',
       coalesce((SELECT sum(cardinality(event_ids)) FROM deliveries v
                 WHERE v.destination_key = d.destination_key), 0)
         + (SELECT count(*) FROM jobs j
            WHERE j.destination_key = d.destination_key AND j.state = 'succeeded'),
       (SELECT count(*) FROM job_statuses s JOIN jobs j USING (job_id)
        WHERE j.destination_key = d.destination_key AND s.state = 'failed'),
       (SELECT count(*) FROM jobs j
        WHERE j.destination_key = d.destination_key AND j.state = 'aborted')
FROM destinations d
"""


def fill(name: str, events: int) -> dict[str, int]:
    """The log and its rows; returns job ids for GetJob (by what they are)."""
    started = time.perf_counter()
    frontier = events - round(events * PENDING)
    recent = frontier - round(events * RECENT)
    recorded = frontier + round(events * PENDING * RECORDED_AHEAD)
    users = max(100, min(10_000, events // 100))
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        source_keys, tenant_keys = [], []
        for number, (tenant, source) in enumerate(SOURCES):
            first = number * FANOUT if tenant == "acme" else 0
            _, tenant_key, source_key, _ = add_source(
                conn, tenant, source, {f"{tenant}-d{first + d}": ("grpc", "127.0.0.1:9")
                                       for d in range(FANOUT)})
            source_keys.append(source_key)
            tenant_keys.append(tenant_key)

    async def ensure() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            await partitions.ensure(c, upto_event_id=events + 1)

    asyncio.run(ensure())
    step = 100_000
    steps = [(start, min(events + 1, start + step)) for start in range(1, events + 1, step)]
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        for start, stop in steps:
            conn.execute(EVENTS, {"start": start, "stop": stop, "users": users,
                                  "source_keys": source_keys, "tenant_keys": tenant_keys,
                                  "spacing": 0.9 * 86_400_000 / events})
        conn.execute("SELECT setval('events_event_id_seq', %s)", (events,))
        conn.execute("VACUUM (ANALYZE) events")
        conn.execute(STUCK, {"recent": recent, "frontier": frontier})
        for start, stop in steps:
            conn.execute(SETTLED_ROWS, {"start": start, "stop": min(stop, recent + 1)})
        conn.execute(STATUSES)
        conn.execute("VACUUM (ANALYZE) jobs")
        for start, stop in steps:
            conn.execute(DELIVERIES, {"start": start, "stop": min(stop, recorded + 1)})
        conn.execute("UPDATE router_leases SET frontier = %s", (frontier,))
        conn.execute(COUNTS)
        for table in ("events", "jobs", "job_statuses", "deliveries", "delivery_counts",
                      "router_leases"):
            conn.execute(f"VACUUM (ANALYZE) {table}")
        states = dict(conn.execute("SELECT state::text, count(*) FROM jobs GROUP BY 1").fetchall())
        ids = {
            "failed": one(conn, "SELECT min(job_id) FROM jobs"
                                " WHERE state = 'failed' AND attempts >= 3"),
            "settled": one(conn, "SELECT (e.event_id << 16) | c.slot FROM events e"
                                 " JOIN connections c USING (source_key) WHERE e.event_id = %s"
                                 " AND NOT EXISTS (SELECT 1 FROM jobs j"
                                 "  WHERE j.job_id = (e.event_id << 16) | c.slot)"
                                 " ORDER BY c.slot LIMIT 1", (events // 2,)),
            "pending": one(conn, "SELECT (e.event_id << 16) | c.slot FROM events e"
                                 " JOIN connections c USING (source_key) WHERE e.event_id = %s"
                                 " ORDER BY c.slot LIMIT 1", (events,)),
        }
    ids["message"] = events * 424_242 // 1_000_000
    rows = ", ".join(f"{states.get(s, 0):,} {s}" for s in
                     ("failed", "waiting", "aborted", "succeeded"))
    print(f"filled {events:,} events ({events * FANOUT:,} jobs; frontier at {frontier:,}:"
          f" {(events - frontier) * FANOUT:,} jobs above it, {(recorded - frontier) * FANOUT:,}"
          f" of them recorded; rows: {rows}) in {time.perf_counter() - started:.0f} s")
    return ids


def one(conn: psycopg.Connection[Any], statement: str, params: tuple[object, ...] = ()) -> int:
    row = conn.execute(statement, params).fetchone()  # type: ignore[arg-type]
    assert row is not None, statement
    assert row[0] is not None, statement
    return int(row[0])


def queries(ids: dict[str, int]) -> list[tuple[str, str, Any]]:
    listing = admin_pb2.ListJobsRequest
    return [
        ("ListJobs: one destination's failed jobs with 3+ attempts",
         "ListJobs", listing(
             filter="destination = 'acme-d7' AND state = 'failed' AND attempts >= 3",
             page_size=100)),
        ("ListJobs: stuck jobs (failed or waiting) of a destination",
         "ListJobs", listing(
             filter="destination = 'acme-d3' AND state IN ('failed', 'waiting')",
             page_size=100)),
        ("ListJobs: a destination's stuck jobs of one event, payloads",
         "ListJobs", listing(
             filter="destination = 'acme-d7' AND state IN ('failed', 'waiting')"
                    " AND payload.event = 'Cart Updated'", include_payload=True)),
        ("ListJobs (log): a time window, succeeded (first page)",
         "ListJobs", listing(
             filter="created_at >= '2026-01-01' AND state = 'succeeded'", page_size=100)),
        ("ListJobs (log): a destination's jobs (first page)",
         "ListJobs", listing(filter="destination = 'acme-d7'", page_size=100)),
        ("ListJobs (log): a destination's pending jobs (first page)",
         "ListJobs", listing(filter="destination = 'acme-d7' AND state = 'pending'",
                             page_size=100)),
        ("ListJobs (log): one message id (first page)",
         "ListJobs", listing(filter=f"message_id = 'msg-{ids['message']}'")),
        ("GetJob: a failed job (a row, 3+ attempts)",
         "GetJob", admin_pb2.GetJobRequest(job_id=ids["failed"])),
        ("GetJob: a delivered job (no row, below the frontier)",
         "GetJob", admin_pb2.GetJobRequest(job_id=ids["settled"])),
        ("GetJob: a pending job (no row, above the frontier)",
         "GetJob", admin_pb2.GetJobRequest(job_id=ids["pending"])),
        ("PeekJobs: a destination's next 20 (rows and log)",
         "PeekJobs", admin_pb2.PeekJobsRequest(destination_id="acme-d3", limit=20)),
        ("RetryJobs dry run: a destination's failed jobs",
         "RetryJobs", admin_pb2.RetryJobsRequest(
             selector=admin_pb2.JobSelector(filter="destination = 'acme-d3'"
                                                   " AND state = 'failed'"), dry_run=True)),
        ("AbortJobs dry run: a destination's pending jobs (log)",
         "AbortJobs", admin_pb2.AbortJobsRequest(
             selector=admin_pb2.JobSelector(filter="destination = 'acme-d3'"
                                                   " AND state = 'pending'"), dry_run=True)),
        ("GetStats: everything (50 destinations, 2 tenants)",
         "GetStats", admin_pb2.GetStatsRequest()),
        ("GetStats: one tenant", "GetStats", admin_pb2.GetStatsRequest(tenant_id="beta")),
        ("GetStats: one destination",
         "GetStats", admin_pb2.GetStatsRequest(destination_id="acme-d7")),
    ]


def rows_of(method: str, answer: Any) -> int:
    """What an answer holds: jobs listed or peeked, history entries, destinations, matches."""
    if method in ("ListJobs", "PeekJobs"):
        return len(answer.jobs)
    if method == "GetJob":
        return len(answer.history)
    if method == "GetStats":
        return len(answer.destinations)
    return int(answer.matched)


def measure(port: int, calls: int, seconds: float, ids: dict[str, int]) -> None:
    """Each call, warmed up, then timed. A call the service fails (its statement timeout, say)
    is said with the calls that went well before it, and not tried again."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        print(f"{'call':<62} {'rows':>5} {'calls':>5} {'median ms':>10} {'p99 ms':>8}")
        for label, method, request in queries(ids):
            call = getattr(stub, method)
            answer = None
            times: list[float] = []
            made = 0
            try:
                began = time.perf_counter()
                for _ in range(10):  # warm up: connections, plans
                    started = time.perf_counter()
                    made += 1
                    answer = call(request, metadata=metadata, timeout=600)
                    if time.perf_counter() - began > seconds / 4:
                        break
                began = time.perf_counter()
                while len(times) < calls and (len(times) < 3
                                              or time.perf_counter() - began < seconds):
                    started = time.perf_counter()
                    made += 1
                    answer = call(request, metadata=metadata, timeout=600)
                    times.append((time.perf_counter() - started) * 1000)
            except grpc.RpcError as exc:
                failed: grpc.RpcError | None = exc
                took = time.perf_counter() - started
            else:
                failed = None
            if times and answer is not None:
                print(f"{label:<62} {rows_of(method, answer):>5} {len(times):>5}"
                      f" {statistics.median(times):>10.1f} {percentile(times, 0.99):>8.1f}")
            else:
                print(f"{label:<62} {'-':>5} {0:>5} {'-':>10} {'-':>8}")
            if failed is not None:
                print(f"  call {made} (warm-up included) failed after {took:.1f} s:"
                      f" {failed.code().name}: {failed.details()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30,
                        help="at most this long timing one call (at least 3 calls)")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: 10,000 events, 20 calls, 2 s a call")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.calls, args.seconds = 10_000, 20, 2
    name = create_database()
    admin = None
    try:
        ids = fill(name, args.events)
        port = free_port()
        admin = spawn("admin_service.main", {
            "RELAYQ_DATABASE_URL": dsn_for(name), "RELAYQ_ADMIN_TOKEN": TOKEN,
            "RELAYQ_ADMIN_ADDRESS": f"127.0.0.1:{port}", "RELAYQ_ADMIN_METRICS_ADDRESS": "off"})
        wait_ready(port)
        measure(port, args.calls, args.seconds, ids)
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
