"""relayq-ingest: process entry point and the app object tests start in-process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from psycopg_pool import AsyncConnectionPool

from ingest_service import metrics
from ingest_service.committer import GroupCommitter
from ingest_service.config import IngestConfig
from ingest_service.routes import RouteCache
from ingest_service.service import IngestServicer
from jobsdb import errors as dberrors
from jobsdb import maintenance, migrate, partitions
from jobsdb.ingest import NewEvent, Stored, store_events, unstorable
from jobsdb.listen import Listener
from jobsdb.pool import connection, open_pool, transaction
from relayq import process, supervisor
from relayq.app import ServiceApp
from relayq.server import start_server
from relayq.tasks import cancel_and_wait
from relayq.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("relayq.ingest")

APP_NAME = "relayq-ingest"


class IngestApp(ServiceApp[IngestConfig]):
    """A running ingest: pool, group committer, route cache, listener, maintenance, server."""

    def __init__(self, config: IngestConfig) -> None:
        super().__init__(config)
        self._pool: AsyncConnectionPool | None = None
        self._committer: GroupCommitter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._settings: partitions.Settings | None = None
        self._job_partition_seen = -1
        self._ensuring: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        config = self.config
        self._settings = await migrate.prepare(
            config.database_url, apply=config.migrate, wait_seconds=config.startup_timeout_seconds,
            application_name=APP_NAME,
        )
        # No check on checkout: a flush is two round trips and a check would add a third;
        # _store retries once instead when a pooled connection turns out dead.
        self._pool = await open_pool(
            config.database_url, application_name=APP_NAME, min_size=config.flush_concurrency,
            max_size=config.pool_size, check=False,
        )
        routes = RouteCache(self._pool, config.route_cache_seconds)
        listener = Listener(
            config.database_url, {"relayq_config": routes.invalidate},
            application_name=APP_NAME, on_reconnect=routes.invalidate,
        )
        self._tasks.append(asyncio.create_task(listener.run(), name="config-listener"))
        if config.maintenance is not None:
            self._tasks.append(asyncio.create_task(
                maintenance.run_forever(config.database_url, config.maintenance,
                                        application_name=APP_NAME),
                name="maintenance"))
        self._committer = GroupCommitter(
            self._store,
            delay=config.flush_delay_seconds,
            max_jobs=config.flush_max_jobs,
            concurrency=config.flush_concurrency,
            on_flushed=metrics.flushed,
            probe=self._refused,
        )
        self._committer.start()
        servicer = IngestServicer(routes, self._committer, config.limits)
        self._server = await start_server(
            config.server,
            [(ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name,
              lambda server: ingest_pb2_grpc.add_IngestServicer_to_server(servicer, server))],
            options=[
                # Requests up to twice the limit are read, so that one over it gets
                # INVALID_ARGUMENT naming the limit (validate.prepare): gRPC's own refusal is
                # RESOURCE_EXHAUSTED, which clients retry as if it were a rate limit.
                ("grpc.max_receive_message_length", 2 * config.limits.max_request_bytes),
            ],
        )

    async def stop(self) -> None:
        """Drain: stop taking RPCs, let in-flight ones finish (their flushes commit), close."""
        if self._server is not None:
            await self._server.stop(self.config.server.grace_seconds)
        if self._committer is not None:
            await self._committer.close()
        await cancel_and_wait(self._tasks)
        if self._ensuring is not None:
            with contextlib.suppress(Exception):
                await self._ensuring
        if self._pool is not None:
            await self._pool.close()

    async def _store(self, events: Sequence[NewEvent]) -> list[Stored]:
        try:
            stored = await self._store_once(events)
        except dberrors.MissingPartition:
            # Maintenance fell behind the sequence (or is switched off): catch up and retry.
            await self._ensure_partitions()
            stored = await self._store_once(events)
        except dberrors.DatabaseUnavailable:
            # Most often a pooled connection that died with a Postgres restart: the pool has
            # dropped it, so try once more on another. Safe even if the commit went through:
            # the retry then finds the message ids claimed and reports duplicates.
            stored = await self._store_once(events)
        self._after_store(stored)
        return stored

    async def _store_once(self, events: Sequence[NewEvent]) -> list[Stored]:
        assert self._pool is not None
        assert self._settings is not None
        async with transaction(self._pool) as conn, conn.pipeline(), conn.transaction():
            return await store_events(
                conn, events, ordering_partitions=self._settings.ordering_partitions)

    async def _refused(self, events: Sequence[NewEvent]) -> dict[int, str]:
        """Which of `events` Postgres refuses to store, by position (see GroupCommitter)."""
        assert self._pool is not None
        async with transaction(self._pool) as conn:
            refused = await unstorable(conn, [event.document for event in events])
        return {i: f"payload: Postgres refuses it: {reason}" for i, reason in refused.items()}

    def _after_store(self, stored: list[Stored]) -> None:
        """When ids enter a new partition, create the next ones in the background."""
        assert self._settings is not None
        top = max((s.event_id for s in stored if s.event_id is not None), default=-1)
        number = top // self._settings.event_partition_size
        if top >= 0 and number > self._job_partition_seen:
            self._job_partition_seen = number
            if self._ensuring is None or self._ensuring.done():
                self._ensuring = asyncio.create_task(self._ensure_partitions())

    async def _ensure_partitions(self) -> None:
        try:
            async with connection(self.config.database_url, application_name=APP_NAME,
                                  autocommit=True) as conn:
                await partitions.ensure(conn)
        except dberrors.JobsDBError as exc:
            log.warning("could not create job partitions: %s", exc)


# RELAYQ_INGEST_WORKERS processes serving one port: connections are spread over them.
WORKERS = supervisor.Plan[IngestConfig](module=__name__, count=lambda config: config.workers,
                                         prepare=supervisor.migrated(APP_NAME))


def main() -> None:
    process.main(APP_NAME, IngestConfig.from_env, IngestApp.start, WORKERS)
