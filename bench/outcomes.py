"""What the lease fence costs a router's outcome write on the row path
(jobsdb.queue.record_outcomes).

Since the event log (migration 0012) most jobs have no row: a router records their success by
moving a cursor and writing a `deliveries` row. record_outcomes is the path of the jobs that
do have one (retries of failed jobs, released waiters, operators' retries), and it is fenced
the same way. So: --jobs events of one source with one destination, 10,000 users spread over
the 64 ordering partitions by their ordering key (as ingest places them), each job with a
pending row as a released waiter has it (the row path; as tests/factories.pending_rows makes
them), all partitions leased to router "bench"; batches of --batch successes are recorded in
turn fenced (owner="bench": the lease rows share-locked and checked, as a router writes) and
unfenced (owner=None), each in its own transaction, and the median and minimum of each kind
are printed with their ratio.

    .venv/bin/python bench/outcomes.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_source, create_database, drop_database, dsn_for, percentile
from jobsdb import partitions, queue

# The log: one event per job, in the ordering partition ingest gives its user.
EVENTS = """
INSERT INTO events (event_id, source_key, tenant_key, ordering_partition, user_id, message_id,
                    document)
SELECT nextval('events_event_id_seq'), %(source_key)s, %(tenant_key)s,
       ordering_partition_of('user-' || (i %% 10000), 64), 'user-' || (i %% 10000), 'msg-' || i,
       '{"n": 1}'
FROM generate_series(1, %(jobs)s) AS i
"""

# A pending row per (event, connected destination), as a released waiter has
# (tests/factories.pending_rows).
ROWS = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  created_at, user_id, message_id)
SELECT (e.event_id << 16) | c.slot, c.destination_key, e.tenant_key, e.source_key,
       e.ordering_partition, 'pending', e.created_at, e.user_id, e.message_id
FROM events e
JOIN connections c ON c.source_key = e.source_key
 AND (e.destinations IS NULL OR c.destination_key = ANY(e.destinations))
ORDER BY 1
RETURNING job_id
"""


async def measure(dsn: str, job_ids: list[int], batch: int) -> dict[str, list[float]]:
    started = datetime.now(UTC)
    seconds: dict[str, list[float]] = {"fenced": [], "unfenced": []}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for n, first in enumerate(range(0, len(job_ids) - batch + 1, batch)):
            kind = "fenced" if n % 2 else "unfenced"
            outcomes = [queue.Outcome(job_id, 1, "succeeded", started, 1)
                        for job_id in job_ids[first:first + batch]]
            clock = time.perf_counter()
            async with conn.transaction():
                recorded = await queue.record_outcomes(
                    conn, outcomes, actor="router:bench",
                    owner="bench" if kind == "fenced" else None)
            seconds[kind].append(time.perf_counter() - clock)
            assert len(recorded.moved) == batch
    return seconds


async def ensure_partitions(dsn: str, events: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await partitions.ensure(conn, upto_event_id=events + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds: 20,000 jobs, batches of 500")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.batch = 20_000, 500
    name = create_database()
    try:
        dsn = dsn_for(name)
        asyncio.run(ensure_partitions(dsn, args.jobs))
        with psycopg.connect(dsn, autocommit=True) as conn:
            _, tenant_key, source_key, _ = add_source(
                conn, "t", "s", {"d": ("grpc", "127.0.0.1:9")})
            conn.execute(EVENTS, {"tenant_key": tenant_key, "source_key": source_key,
                                  "jobs": args.jobs})
            job_ids = sorted(row[0] for row in conn.execute(ROWS).fetchall())
            conn.execute("VACUUM ANALYZE events")
            conn.execute("VACUUM ANALYZE jobs")
            conn.execute("UPDATE router_leases SET owner = 'bench',"
                         " expires_at = now() + interval '1 hour'")
        seconds = asyncio.run(measure(dsn, job_ids, args.batch))
    finally:
        drop_database(name)
    medians = {kind: percentile(values, 0.5) for kind, values in seconds.items()}
    for kind, values in seconds.items():
        print(f"{kind}: {len(values)} writes of {args.batch} outcomes,"
              f" median {medians[kind] * 1000:.1f} ms, min {min(values) * 1000:.1f} ms")
    print(f"fenced / unfenced (medians): {medians['fenced'] / medians['unfenced']:.2f}")


if __name__ == "__main__":
    main()
