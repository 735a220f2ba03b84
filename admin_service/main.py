"""relayq-admin: process entry point and the app object tests start in-process."""

from __future__ import annotations

import logging

from psycopg_pool import AsyncConnectionPool

from admin_service.config import CONSOLE_ADDRESS, AdminConfig
from admin_service.console import server as console_server
from admin_service.ops import Operations
from admin_service.service import AdminServicer
from jobsdb import migrate, sealing
from jobsdb.pool import open_pool
from relayq import addresses, jobmetrics, process
from relayq.app import ServiceApp
from relayq.auth import Authenticator
from relayq.server import start_server
from relayq.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger("relayq.admin")

APP_NAME = "relayq-admin"


class AdminApp(ServiceApp[AdminConfig]):
    """A running admin service: a small pool, the gRPC server and, when configured, the
    console, both calling the same operations (admin_service.ops)."""

    def __init__(self, config: AdminConfig) -> None:
        super().__init__(config)
        self._pool: AsyncConnectionPool | None = None
        self._job_states: jobmetrics.JobMetrics | None = None
        self.console: console_server.ConsoleServer | None = None

    async def _start(self) -> None:
        config = self.config
        if config.console is not None:
            # Before anything starts: a taken console port stops the process at once.
            addresses.check(CONSOLE_ADDRESS, config.console.address)
        await migrate.prepare(config.database_url, apply=config.migrate,
                              wait_seconds=config.startup_timeout_seconds,
                              application_name=APP_NAME)
        if config.keyring is not None:
            await sealing.start(config.database_url, config.keyring,
                                application_name=APP_NAME)
        self._pool = await open_pool(config.database_url, application_name=APP_NAME,
                                     min_size=1, max_size=config.pool_size,
                                     statement_timeout_ms=config.statement_timeout_ms)
        ops = Operations(self._pool, config.destination_policy)
        auth = Authenticator(self._pool, config.operator_token)
        servicer = AdminServicer(ops, auth)
        if config.server.metrics_address is not None:
            self._job_states = jobmetrics.register(self._pool)
        self._server = await start_server(
            config.server,
            [(admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
              lambda server: admin_pb2_grpc.add_AdminServicer_to_server(servicer, server))],
        )
        if config.console is not None:
            self.console = await console_server.start(config.console, ops, self._pool, auth,
                                                      config.operator_token)

    async def stop(self) -> None:
        """Let in-flight calls finish, then close."""
        if self.console is not None:
            await self.console.stop()
        if self._server is not None:
            await self._server.stop(self.config.server.grace_seconds)
        if self._job_states is not None:
            jobmetrics.unregister(self._job_states)
        if self._pool is not None:
            await self._pool.close()


def main() -> None:
    process.main(APP_NAME, AdminConfig.from_env, AdminApp.start)
