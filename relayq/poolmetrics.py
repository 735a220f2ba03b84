"""Postgres pool use as Prometheus gauges: relayq_db_pool_connections{pool, state} and
relayq_db_pool_waiting{pool}, for every pool the process opened (jobsdb.pool.open_pools).

Read from psycopg_pool's own counters once a second by a task of the serving process, rather
than at scrape time: a worker of a supervisor (relayq.supervisor) has no scrape of its own,
its gauges reach /metrics through the supervisor's multiprocess directory, where `livesum`
adds the workers' pools up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from prometheus_client import Gauge

from jobsdb.pool import open_pools

log = logging.getLogger(__name__)

CONNECTIONS = Gauge(
    "relayq_db_pool_connections",
    "Postgres connections of each pool: in_use (lent out), idle (ready), max (the most it"
    " may open).", ["pool", "state"], multiprocess_mode="livesum")
WAITING = Gauge(
    "relayq_db_pool_waiting",
    "Requests waiting for a connection of the pool (above 0 for long: the pool is too small"
    " or Postgres too slow).", ["pool"], multiprocess_mode="livesum")

INTERVAL_SECONDS = 1.0


def sample() -> None:
    """Set the gauges from the pools as they are now (pools of one name add up)."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for pool in open_pools():
        stats = pool.get_stats()
        total = totals[pool.name]
        total["in_use"] += stats.get("pool_size", 0) - stats.get("pool_available", 0)
        total["idle"] += stats.get("pool_available", 0)
        total["max"] += stats.get("pool_max", 0)
        total["waiting"] += stats.get("requests_waiting", 0)
    for name, total in totals.items():
        for state in ("in_use", "idle", "max"):
            CONNECTIONS.labels(name, state).set(total[state])
        WAITING.labels(name).set(total["waiting"])


async def run(interval: float = INTERVAL_SECONDS) -> None:
    """Sample until cancelled."""
    while True:
        try:
            sample()
        except Exception:  # a report must never take its process down
            log.exception("could not sample the connection pools")
        await asyncio.sleep(interval)


def start() -> asyncio.Task[None]:
    return asyncio.create_task(run(), name="pool metrics")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
