"""What the lease fence costs a router's outcome write (jobsdb.queue.record_outcomes).

--jobs pending jobs of one destination spread over the 64 ordering partitions, all leased to
router "bench"; batches of --batch successes are recorded in turn fenced (owner="bench": the
lease rows share-locked and checked, as a router writes) and unfenced (owner=None), each in its
own transaction, and the median and minimum of each kind are printed with their ratio.

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
from jobsdb import queue

FILL = """
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition,
                  user_id, message_id, payload)
SELECT nextval('jobs_job_id_seq'), %(destination_key)s, %(tenant_key)s, %(source_key)s,
       (i %% 64)::smallint, 'user-' || (i %% 10000), 'msg-' || i, '{"n": 1}'
FROM generate_series(1, %(jobs)s) AS i
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
        with psycopg.connect(dsn, autocommit=True) as conn:
            _, tenant_key, source_key, keys = add_source(
                conn, "t", "s", {"d": ("grpc", "127.0.0.1:9")})
            job_ids = [row[0] for row in conn.execute(FILL, {
                "destination_key": keys["d"], "tenant_key": tenant_key,
                "source_key": source_key, "jobs": args.jobs}).fetchall()]
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
