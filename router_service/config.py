"""relayq-router's configuration, read once from RELAYQ_* variables and validated at start."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta

from jobsdb import maintenance, sealing
from relayq.auth import operator_token
from relayq.config import (
    ConfigError,
    Env,
    ServerConfig,
    destination_policy,
    maintenance_policy,
    secret_keys,
    workers,
)
from router_service.settings import EngineSettings

# Long enough for any host name and port; workers add `/<number>` to it.
MAX_ID = 200


@dataclass(frozen=True)
class RouterConfig:
    database_url: str
    server: ServerConfig
    engine: EngineSettings
    pool_size: int
    migrate: bool
    maintenance: maintenance.Policy | None
    startup_timeout_seconds: float
    # RouterStatus answers the operator with this token, and tenant tokens for their own
    # tenant. None: tenant tokens only (delivery never depends on it).
    operator_token: str | None = None
    # RELAYQ_SECRET_KEYS: what opens destinations' sealed secrets (jobsdb.sealing).
    keyring: sealing.Keyring | None = None
    # Router processes sharing the port and the leases (relayq.supervisor), each a router of
    # its own; 1: this process alone.
    workers: int = 1

    @classmethod
    def from_env(cls, env: Env | None = None) -> RouterConfig:
        env = env or Env()
        server = ServerConfig.from_env(env, "router", 50053, 9153)
        router_id = env.text("RELAYQ_ROUTER_ID", default_router_id(server.address))
        if len(router_id) > MAX_ID:
            raise ConfigError("RELAYQ_ROUTER_ID", f"longer than {MAX_ID} characters")
        batch = env.integer("RELAYQ_ROUTER_BATCH", 500, minimum=1, maximum=10_000)
        return cls(
            database_url=env.database_url(),
            server=server,
            engine=EngineSettings(
                router_id=router_id,
                lease=timedelta(seconds=env.number(
                    "RELAYQ_ROUTER_LEASE_SECONDS", 15.0, minimum=1.0, maximum=600)),
                batch=batch,
                max_held=env.integer("RELAYQ_ROUTER_MAX_HELD", 4 * batch, minimum=2 * batch,
                                     maximum=1_000_000),
                permits=env.integer("RELAYQ_ROUTER_PERMITS", 512, minimum=1, maximum=100_000),
                grpc_batch=env.integer("RELAYQ_ROUTER_GRPC_BATCH", 100, minimum=1,
                                       maximum=10_000),
                poll_seconds=env.number("RELAYQ_ROUTER_POLL_SECONDS", 2.0, minimum=0.05,
                                        maximum=3600),
                flush_delay=env.number("RELAYQ_ROUTER_FLUSH_DELAY_MS", 5.0, maximum=1000) / 1000,
                flush_max=env.integer("RELAYQ_ROUTER_FLUSH_MAX", 2000, minimum=1,
                                      maximum=100_000),
                flush_concurrency=env.integer("RELAYQ_ROUTER_FLUSH_CONCURRENCY", 2, minimum=1,
                                              maximum=8),
                read_alone_above=env.integer("RELAYQ_ROUTER_READ_ALONE_ABOVE", 100, minimum=0,
                                             maximum=1_000_000),
                log_window=env.integer("RELAYQ_ROUTER_LOG_WINDOW", batch, minimum=1,
                                       maximum=1_000_000),
                log_window_bytes=env.integer("RELAYQ_ROUTER_LOG_WINDOW_MB", 64, minimum=1,
                                             maximum=1_000_000) * 1024 * 1024,
                destination_ca_file=env.file("RELAYQ_DESTINATION_CA_FILE"),
                destination_policy=destination_policy(env),
            ),
            pool_size=env.integer("RELAYQ_ROUTER_POOL_SIZE", 8, minimum=3, maximum=1000),
            migrate=env.flag("RELAYQ_MIGRATE", True),
            maintenance=maintenance_policy(env),
            startup_timeout_seconds=env.number(
                "RELAYQ_STARTUP_TIMEOUT_SECONDS", 30.0, maximum=3600),
            operator_token=operator_token(env, required=False),
            workers=workers(env, "RELAYQ_ROUTER_WORKERS", "1"),
            keyring=secret_keys(env),
        )


def default_router_id(address: str) -> str:
    """The same across restarts of a router on this host with this configuration, so that a
    restarted router takes its own unexpired leases back at once (router_service.identity
    proves the previous process is gone); routers on one host differ by their port. Port 0
    (tests) is no identity: then the process's own."""
    host = socket.gethostname()
    port = address.rpartition(":")[2]
    if port in ("", "0"):
        return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"
    return f"{host}:{port}"


def worker_id(router_id: str, index: int) -> str:
    """A router worker's id: its supervisor's (RELAYQ_ROUTER_ID, or `<host>:<port>`) and its
    number, the same across restarts of the worker, so a restarted worker takes its own leases
    back at once as a restarted router does."""
    return f"{router_id}/{index}"
