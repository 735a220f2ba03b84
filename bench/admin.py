"""Admin latency on a big queue: ListJobs with selective filters and GetStats, 1,000,000 jobs.

    .venv/bin/python bench/admin.py [--jobs 1000000] [--calls 200]

Fills a fresh database with jobs as a busy cluster leaves them (50 destinations of two
tenants, 10,000 users, ~330-byte payloads; 90% succeeded, 8% pending, 1% failed, 0.5%
waiting, 0.5% aborted), vacuums it as autovacuum would, starts relayq-admin as its own
process, and times each call from a gRPC client: median and p99 over --calls calls.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
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

FILL = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  attempts, retry_at, first_attempt_at, created_at, updated_at, user_id,
                  message_id, error_code, payload)
SELECT nextval('jobs_job_id_seq'), d.destination_key, d.tenant_key, %(source_key)s,
       (i %% 64)::smallint,
       CASE WHEN i %% 1000 < 900 THEN 'succeeded'
            WHEN i %% 1000 < 980 THEN 'pending'
            WHEN i %% 1000 < 990 THEN 'failed'
            WHEN i %% 1000 < 995 THEN 'waiting'
            ELSE 'aborted' END::job_state,
       CASE WHEN i %% 1000 < 900 THEN 1 WHEN i %% 1000 < 980 THEN 0 ELSE 1 + i %% 5 END,
       CASE WHEN i %% 1000 BETWEEN 980 AND 989 THEN now() + interval '10 minutes' END,
       now() - interval '1 day' + i * interval '80 milliseconds',
       now() - interval '1 day' + i * interval '80 milliseconds',
       now() - interval '1 day' + i * interval '80 milliseconds',
       'user-' || (i %% 10000),
       'msg-' || i,
       CASE WHEN i %% 1000 >= 980 THEN '503' END,
       jsonb_build_object(
           'type', 'track',
           'event', (ARRAY['Order Completed', 'Product Viewed', 'Cart Updated',
                           'Checkout Started', 'Signed In'])[1 + i %% 5],
           'userId', 'user-' || (i %% 10000),
           'messageId', 'msg-' || i,
           'timestamp', '2026-11-25T10:00:00.000Z',
           'properties', jsonb_build_object(
               'order_id', i, 'sku', 'sku-' || (i %% 997), 'revenue', (i %% 500) / 10.0,
               'currency', 'EUR', 'coupon', 'WINTER-' || (i %% 13),
               'note', repeat('x', 120)))
FROM generate_series(%(start)s, %(stop)s - 1) AS i
JOIN destinations d
  ON d.destination_key = %(first_destination)s + (i + i / 1000) %% %(destinations)s
"""

COUNTS = """
INSERT INTO delivery_counts (destination_key, bucket, succeeded, failed, aborted)
SELECT destination_key, '-infinity', count(*) FILTER (WHERE state = 'succeeded'),
       count(*) FILTER (WHERE state = 'failed'), count(*) FILTER (WHERE state = 'aborted')
FROM jobs GROUP BY destination_key
"""

QUERIES: list[tuple[str, str, object]] = [
    ("ListJobs: one destination's failed jobs with 3+ attempts",
     "ListJobs", admin_pb2.ListJobsRequest(
         filter="destination = 'acme-d7' AND state = 'failed' AND attempts >= 3",
         page_size=100)),
    ("ListJobs: stuck jobs (failed or waiting) of a destination",
     "ListJobs", admin_pb2.ListJobsRequest(
         filter="destination = 'acme-d3' AND state IN ('failed', 'waiting')", page_size=100)),
    ("ListJobs: one message id",
     "ListJobs", admin_pb2.ListJobsRequest(filter="message_id = 'msg-424242'")),
    ("ListJobs: a destination's stuck jobs of one event, with payloads",
     "ListJobs", admin_pb2.ListJobsRequest(
         filter="destination = 'acme-d7' AND state IN ('failed', 'waiting')"
                " AND payload.event = 'Cart Updated'", include_payload=True)),
    ("ListJobs: a time window (first page)",
     "ListJobs", admin_pb2.ListJobsRequest(
         filter="created_at >= '2026-01-01' AND state = 'succeeded'", page_size=100)),
    ("GetStats: everything (50 destinations, 2 tenants)",
     "GetStats", admin_pb2.GetStatsRequest()),
    ("GetStats: one tenant", "GetStats", admin_pb2.GetStatsRequest(tenant_id="beta")),
    ("GetStats: one destination",
     "GetStats", admin_pb2.GetStatsRequest(destination_id="acme-d7")),
]


def fill(name: str, jobs: int) -> None:
    started = time.perf_counter()
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        _, _, source_key, acme = add_source(
            conn, "acme", "acme-web", {f"acme-d{i}": ("grpc", "127.0.0.1:9") for i in range(40)})
        add_source(conn, "beta", "beta-web",
                   {f"beta-d{i}": ("grpc", "127.0.0.1:9") for i in range(10)})
        first = min(acme.values())

    async def ensure() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            await partitions.ensure(c, upto_job_id=jobs + 1)

    asyncio.run(ensure())
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        step = 100_000
        for start in range(0, jobs, step):
            conn.execute(FILL, {"source_key": source_key, "start": start,
                                "stop": min(jobs, start + step), "first_destination": first,
                                "destinations": 50})
        conn.execute(COUNTS)
        conn.execute("VACUUM (ANALYZE) jobs")
        conn.execute("VACUUM (ANALYZE) delivery_counts")
    print(f"filled {jobs:,} jobs in {time.perf_counter() - started:.0f} s")


def measure(port: int, calls: int) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        print(f"{'call':<62} {'rows':>5} {'median ms':>10} {'p99 ms':>8}")
        for label, method, request in QUERIES:
            call = getattr(stub, method)
            for _ in range(10):  # warm up: connections, plans
                answer = call(request, metadata=metadata)
            times = []
            for _ in range(calls):
                began = time.perf_counter()
                answer = call(request, metadata=metadata)
                times.append((time.perf_counter() - began) * 1000)
            rows = len(answer.jobs) if method == "ListJobs" else len(answer.destinations)
            print(f"{label:<62} {rows:>5} {statistics.median(times):>10.1f}"
                  f" {percentile(times, 0.99):>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 20,000 jobs, 20 calls")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.calls = 20_000, 20
    name = create_database()
    admin = None
    try:
        fill(name, args.jobs)
        port = free_port()
        admin = spawn("admin_service.main", {
            "RELAYQ_DATABASE_URL": dsn_for(name), "RELAYQ_ADMIN_TOKEN": TOKEN,
            "RELAYQ_ADMIN_ADDRESS": f"127.0.0.1:{port}", "RELAYQ_ADMIN_METRICS_ADDRESS": "off"})
        wait_ready(port)
        measure(port, args.calls)
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
