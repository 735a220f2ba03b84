"""The gRPC server every relayq process runs: its services, health, reflection, TLS, metrics.

Requests that do not decode are answered INVALID_ARGUMENT by every service (relayq.decoding).

Shaped after grpc's Python examples: a factory returns the started server and its bound port
(port 0 in tests), and shutdown is graceful: health flips to NOT_SERVING first, so load
balancers stop sending, then in-flight RPCs get `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from jobsdb import health as db_health
from relayq import addresses, poolmetrics
from relayq.config import ServerConfig
from relayq.decoding import Registrar

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    service_names: tuple[str, ...]
    metrics_port: int | None
    _stop_metrics: Callable[[], None] | None
    _pool_metrics: asyncio.Task[None] | None = None
    _watching: asyncio.Task[None] | None = None

    async def stop(self, grace: float) -> None:
        if self._watching is not None:
            self._watching.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._pool_metrics is not None:
            await poolmetrics.stop(self._pool_metrics)
        if self._stop_metrics is not None:
            self._stop_metrics()


async def start_server(
    config: ServerConfig,
    services: Sequence[tuple[str, Register]],
    *,
    options: Sequence[tuple[str, Any]] = (),
) -> RunningServer:
    """Start serving `services` (full name, registration function) plus health and reflection.

    Raises AddressUnusable, naming the variable, when either port cannot be bound; nothing is
    left listening then.
    """
    check_addresses(config)
    # gRPC sets SO_REUSEPORT unless told not to, and would then share a port with any other
    # server of the same user that does too, splitting its connections silently. Only
    # workers of one supervisor share their port (relayq.addresses, relayq.supervisor).
    server = grpc.aio.server(options=[*options, ("grpc.so_reuseport", int(config.share_port))])
    # Generated add_*_to_server functions call only the two methods a Registrar has.
    registrar = cast(grpc.aio.Server, Registrar(server))
    for _, register in services:
        register(registrar)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    names = tuple(name for name, _ in services)
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    try:
        port = _add_port(server, config)
    except addresses.AddressUnusable:
        await server.stop(None)
        raise
    metrics_port, stop_metrics = None, None
    if config.metrics_address is not None:
        host, port_text = addresses.split(config.metrics_address)
        try:
            httpd, _thread = start_http_server(port_text, addr=host)
        except OSError as exc:
            await server.stop(None)
            raise addresses.AddressUnusable(config.metrics_variable, config.metrics_address,
                                            addresses.reason(exc)) from None
        metrics_port = httpd.server_port

        def stop_metrics() -> None:
            httpd.shutdown()
            httpd.server_close()

    await server.start()
    for name in ("", *names, DATABASE_HEALTH):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        extra={"services": ",".join(names), "port": port, "tls": config.tls is not None,
               "metrics_port": metrics_port},
    )
    # Served here, or by this worker's supervisor (PROMETHEUS_MULTIPROC_DIR).
    reported = config.metrics_address is not None or bool(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    running = RunningServer(server, port, health, names, metrics_port, stop_metrics,
                            poolmetrics.start() if reported else None)
    running._watching = asyncio.create_task(_watch_database(health), name="database-health")
    return running


# The health service name under which a process reports its database: NOT_SERVING while
# Postgres is unreachable, refuses connections or is out of space (jobsdb.health). The
# process's own services stay SERVING meanwhile: they answer, with UNAVAILABLE or
# RESOURCE_EXHAUSTED saying why, and every process of the cluster shares the one database,
# so a load balancer could send the work nowhere better.
DATABASE_HEALTH = "relayq.database"


async def _watch_database(health: health_aio.HealthServicer, every: float = 0.5) -> None:
    reported: str | None = None
    while True:
        problem = db_health.STATE.problem()
        if problem != reported:
            if problem is not None:
                log.warning("database in trouble: %s", problem)
            else:
                log.info("database well again")
            await health.set(DATABASE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING
                             if problem is not None else health_pb2.HealthCheckResponse.SERVING)
            reported = problem
        await asyncio.sleep(every)


def check_addresses(config: ServerConfig) -> None:
    """Raise AddressUnusable if the gRPC or the metrics address cannot be bound right now."""
    addresses.check(config.address_variable, config.address, shared=config.share_port)
    if config.metrics_address is not None:
        addresses.check(config.metrics_variable, config.metrics_address)


def _add_port(server: grpc.aio.Server, config: ServerConfig) -> int:
    try:
        if config.tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(config.tls.key_file.read_bytes(), config.tls.cert_file.read_bytes())]
            )
            port = server.add_secure_port(config.address, credentials)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError:
        # grpcio >= 1.55 raises "Failed to bind to address"; older ones return 0. Either
        # way the port was free a moment ago (check_addresses): something took it since.
        port = 0
    if port == 0:
        raise addresses.AddressUnusable(config.address_variable, config.address,
                                        "address already in use (taken as the server started)")
    return port


def shutdown_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a main loop to wait on."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
