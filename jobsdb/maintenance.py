"""Housekeeping any relayq process may run: partitions ahead, dedup rotation, retention and
compaction of old partitions, folding old delivery counts.

One process at a time does it (a session advisory lock, tried, never waited on), so running it
in every ingest and router process is safe and keeps working when some of them are down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta

from jobsdb import dedupe, errors, jobs, locks, partitions
from jobsdb.pool import connection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    dedupe_window: timedelta
    # Finished job partitions are dropped once nothing in them changed for this long.
    retention: timedelta
    # ... and once their newest event is this old: the log kept for replay, backfill and
    # GetEvent (RELAYQ_EVENT_RETENTION_SECONDS). None: the same as `retention`.
    event_retention: timedelta | None = None
    # An old partition with fewer unfinished jobs than this for the retention period is
    # compacted (jobsdb.partitions.compact); 0 never compacts.
    compact_below: int = 10_000
    interval_seconds: float = 30.0


async def run_once(dsn: str, policy: Policy, *, application_name: str) -> bool:
    """Do one round if no other process is doing one. Returns whether this process did."""
    async with connection(dsn, application_name=application_name, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (locks.MAINTENANCE,))
        row = await cur.fetchone()
        if not row or not row[0]:
            return False
        try:
            await partitions.ensure(conn)
            await dedupe.rotate(conn, window=policy.dedupe_window)
            await partitions.sweep(conn, retention=policy.retention,
                                   event_retention=policy.event_retention,
                                   compact_below=policy.compact_below)
            await jobs.fold_counts(conn)
            await partitions.index_lookups(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (locks.MAINTENANCE,))
        return True


async def run_forever(dsn: str, policy: Policy, *, application_name: str) -> None:
    while True:
        try:
            await run_once(dsn, policy, application_name=application_name)
        except errors.JobsDBError as exc:
            log.warning("maintenance round failed: %s", exc)
        await asyncio.sleep(policy.interval_seconds)
