"""Job metrics read from Postgres at scrape time: relayq_jobs{tenant, destination, state}, jobs
by state per destination, relayq_jobs_oldest_pending_seconds{tenant, destination}, and
relayq_job_storage_*, what job storage takes on disk.

The job counts are the admin API's GetStats query (jobsdb.jobs.stats): unfinished jobs counted
from their partial indexes, finished ones from the delivery_counts buckets, so a scrape never
counts the whole jobs table. Storage comes from the catalog and file sizes
(jobsdb.partitions.storage): no row is read. Disk that keeps growing while relayq_jobs stays
flat is what an operator watches for: maintenance off, or old partitions held by unfinished
jobs.

Both are read only when Prometheus asks, on the process's own event loop and pool; the metrics
server's thread waits for them (a few seconds at most, after which the scrape simply lacks the
families).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from jobsdb import jobs, partitions

log = logging.getLogger(__name__)

STATES = ("pending", "failed", "waiting", "succeeded", "aborted")


class JobMetrics(Collector):
    def __init__(self, pool: AsyncConnectionPool, loop: asyncio.AbstractEventLoop,
                 timeout: float = 5.0) -> None:
        self._pool = pool
        self._loop = loop
        self._timeout = timeout

    async def _read(self) -> tuple[list[jobs.DestinationStatsRow], partitions.Storage]:
        async with self._pool.connection() as conn:
            return (await jobs.stats(conn, tenant_key=None, destination_key=None),
                    await partitions.storage(conn))

    def describe(self) -> list[Metric]:
        # Nothing up front: registering must not query the database.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            rows, storage = asyncio.run_coroutine_threadsafe(self._read(), self._loop).result(
                self._timeout)
        except Exception as exc:  # a failed read must not fail the scrape
            log.warning("could not read job counts for /metrics: %s", exc)
            return
        family = GaugeMetricFamily(
            "relayq_jobs", "Jobs by state per destination (unfinished: now; succeeded and"
            " aborted: since the destination was created).",
            labels=["tenant", "destination", "state"])
        oldest = GaugeMetricFamily(
            "relayq_jobs_oldest_pending_seconds", "Age of each destination's oldest pending"
            " job (0 when none): how far behind its deliveries are.",
            labels=["tenant", "destination"])
        for row in rows:
            for state in STATES:
                family.add_metric([row.tenant_id, row.destination_id, state],
                                  float(getattr(row, state)))
            oldest.add_metric([row.tenant_id, row.destination_id],
                              float(row.oldest_pending_seconds or 0.0))
        yield family
        yield oldest
        yield from _storage(storage)


def _storage(storage: partitions.Storage) -> Iterator[Metric]:
    size = GaugeMetricFamily(
        "relayq_job_storage_bytes", "Disk taken by jobs and their history, indexes included.",
        labels=["table"])
    count = GaugeMetricFamily(
        "relayq_job_storage_partitions", "Partitions of each job table.", labels=["table"])
    for table in partitions.TABLES:
        size.add_metric([table], float(storage.bytes.get(table, 0)))
        count.add_metric([table], float(storage.partitions.get(table, 0)))
    held = GaugeMetricFamily(
        "relayq_job_storage_old_partitions", "Old jobs partitions maintenance is waiting on:"
        " finished (dropped once quiet for the retention period), sparse (a few unfinished"
        " jobs; compacted once sparse for as long).", labels=["note"])
    held.add_metric(["finished"], float(storage.finished))
    held.add_metric(["sparse"], float(storage.sparse))
    yield from (size, count, held)


def register(pool: AsyncConnectionPool) -> JobMetrics:
    """Export relayq_jobs and relayq_job_storage_* from this process; call from its running
    event loop."""
    collector = JobMetrics(pool, asyncio.get_running_loop())
    REGISTRY.register(collector)
    return collector


def unregister(collector: JobMetrics) -> None:
    REGISTRY.unregister(collector)
