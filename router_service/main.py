"""relayq-router: process entry point and the app object tests start in-process."""

from __future__ import annotations

import asyncio
import logging

from psycopg_pool import AsyncConnectionPool

from jobsdb import maintenance, migrate, sealing
from jobsdb.listen import Listener
from jobsdb.pool import open_pool
from relayq import process, supervisor
from relayq.app import ServiceApp
from relayq.auth import Authenticator
from relayq.server import start_server
from relayq.tasks import cancel_and_wait
from relayq.v1 import router_pb2, router_pb2_grpc
from router_service.config import RouterConfig, worker_id
from router_service.engine import Engine
from router_service.identity import Identity
from router_service.status import RouterStatusServicer

log = logging.getLogger("relayq.router")

APP_NAME = "relayq-router"


class RouterApp(ServiceApp[RouterConfig]):
    """A running router: pool, engine (lanes, leases, flusher), listener, server."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(config)
        self.engine: Engine | None = None
        self._pool: AsyncConnectionPool | None = None
        self._lease_pool: AsyncConnectionPool | None = None
        self._identity: Identity | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def _start(self) -> None:
        config = self.config
        await migrate.prepare(config.database_url, apply=config.migrate,
                              wait_seconds=config.startup_timeout_seconds,
                              application_name=APP_NAME)
        if config.keyring is not None:
            await sealing.start(config.database_url, config.keyring,
                                application_name=APP_NAME)
        # Before any lease is touched: no other live router has our id (router_service.identity),
        # so the unexpired leases of a previous run under this id are ours to take back at once.
        self._identity = Identity(config.database_url, config.engine.router_id,
                                  application_name=APP_NAME)
        await self._identity.claim(wait=config.engine.lease.total_seconds())
        self._pool = await open_pool(config.database_url, application_name=APP_NAME,
                                     min_size=2, max_size=config.pool_size)
        # Heartbeats get a connection of their own: waiting for one behind busy lanes' reads
        # could run the lease out, and a router that loses it has its outcome writes fenced
        # off and its in-flight work delivered again by the next owner. A second connection
        # lets a heartbeat try while one given up on is still stuck on a stalled socket.
        self._lease_pool = await open_pool(config.database_url, application_name=APP_NAME,
                                           min_size=1, max_size=2)
        engine = self.engine = Engine(self._pool, config.engine, lease_pool=self._lease_pool,
                                      identity=self._identity)
        await engine.start()

        def reconnected() -> None:
            # Notifications sent while we were disconnected are lost: look everywhere.
            engine.on_config_notification()
            engine.on_events_notification()
            engine.replays.wake()
            engine.discover()

        listener = Listener(
            config.database_url,
            {"relayq_events": engine.on_events_notification,
             "relayq_jobs": engine.on_jobs_notification,
             "relayq_reorder": engine.on_reorder_notification,
             "relayq_config": engine.on_config_notification,
             "relayq_replays": engine.replays.wake},
            application_name=APP_NAME, on_reconnect=reconnected,
        )
        self._tasks.append(asyncio.create_task(listener.run(), name="listener"))
        if config.maintenance is not None:
            self._tasks.append(asyncio.create_task(
                maintenance.run_forever(config.database_url, config.maintenance,
                                        application_name=APP_NAME),
                name="maintenance"))
        # Anything committed before we listened: look once now.
        engine.discover()
        if config.operator_token is None:
            log.warning("RELAYQ_ADMIN_TOKEN is not set: RouterStatus answers tenant-scoped admin"
                        " tokens only")
        servicer = RouterStatusServicer(engine, Authenticator(self._pool, config.operator_token),
                                        self._pool)
        self._server = await start_server(
            config.server,
            [(router_pb2.DESCRIPTOR.services_by_name["RouterStatus"].full_name,
              lambda server: router_pb2_grpc.add_RouterStatusServicer_to_server(servicer, server))],
        )

    async def stop(self) -> None:
        """Finish or abandon in-flight deliveries, record outcomes, release leases, close."""
        grace = self.config.server.grace_seconds
        if self._server is not None:
            await self._server.health.enter_graceful_shutdown()
        if self.engine is not None:
            await self.engine.stop(grace)
        await cancel_and_wait(self._tasks)
        if self._server is not None:
            await self._server.stop(1.0)
        for pool in (self._pool, self._lease_pool):
            if pool is not None:
                await pool.close()
        if self._identity is not None:
            await self._identity.release()


# RELAYQ_ROUTER_WORKERS routers in one service, sharing its port and, as any routers do, the
# partition leases; each under an id of its own.
WORKERS = supervisor.Plan[RouterConfig](
    module=__name__, count=lambda config: config.workers, prepare=supervisor.migrated(APP_NAME),
    environment=lambda config, index: {
        "RELAYQ_ROUTER_ID": worker_id(config.engine.router_id, index)})


def main() -> None:
    process.main(APP_NAME, RouterConfig.from_env, RouterApp.start, WORKERS)
