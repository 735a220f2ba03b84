"""relayq-admin's configuration, read once from RELAYQ_* variables and validated at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobsdb import sealing
from relayq.auth import operator_token
from relayq.config import (
    ConfigError,
    Env,
    ServerConfig,
    TLSConfig,
    destination_policy,
    secret_keys,
)
from relayq.netpolicy import NetworkPolicy

CONSOLE_ADDRESS = "RELAYQ_ADMIN_CONSOLE_ADDRESS"


@dataclass(frozen=True)
class ConsoleConfig:
    """The operator console: HTTP (HTTPS under the service's TLS files) on its own address."""

    address: str
    tls: TLSConfig | None
    # How long a sign-in lasts.
    session_seconds: int
    # How old the overview's figures may be: one GetStats per this interval and per tenant
    # scope, shared by every open console, whatever the number of viewers.
    stats_seconds: float

    @classmethod
    def from_env(cls, env: Env, tls: TLSConfig | None) -> ConsoleConfig | None:
        """None unless RELAYQ_ADMIN_CONSOLE_ADDRESS is set: the console is off by default."""
        raw = env.text(CONSOLE_ADDRESS, "").lower()
        if raw in ("", "off", "none", "0", "disabled"):
            return None
        address = env.address(CONSOLE_ADDRESS, "")
        host = address.rpartition(":")[0].strip("[]")
        if not host:
            raise ConfigError(CONSOLE_ADDRESS, "give a host, such as 127.0.0.1:8080")
        return cls(
            address=address,
            tls=tls,
            session_seconds=env.integer("RELAYQ_ADMIN_CONSOLE_SESSION_SECONDS", 12 * 3600,
                                        minimum=60, maximum=30 * 86400),
            stats_seconds=env.number("RELAYQ_ADMIN_CONSOLE_STATS_SECONDS", 2.0,
                                     minimum=0.1, maximum=300),
        )


@dataclass(frozen=True)
class AdminConfig:
    database_url: str
    server: ServerConfig
    # Sees and changes everything. Required: an admin port must never be open to anyone.
    operator_token: str
    pool_size: int
    # Statements an operator starts (a retry by a broad filter) stop after this long.
    statement_timeout_ms: int
    migrate: bool
    startup_timeout_seconds: float
    # Endpoints written as addresses the router would refuse are refused when set.
    destination_policy: NetworkPolicy = field(default_factory=NetworkPolicy)
    # RELAYQ_SECRET_KEYS: what seals and opens destinations' secrets (jobsdb.sealing).
    keyring: sealing.Keyring | None = None
    console: ConsoleConfig | None = None

    @classmethod
    def from_env(cls, env: Env | None = None) -> AdminConfig:
        env = env or Env()
        token = operator_token(env, required=True)
        assert token is not None
        server = ServerConfig.from_env(env, "admin", 50052, 9152)
        return cls(
            database_url=env.database_url(),
            server=server,
            operator_token=token,
            pool_size=env.integer("RELAYQ_ADMIN_POOL_SIZE", 4, minimum=1, maximum=100),
            statement_timeout_ms=env.integer(
                "RELAYQ_ADMIN_STATEMENT_TIMEOUT_MS", 30_000, minimum=100, maximum=3_600_000),
            migrate=env.flag("RELAYQ_MIGRATE", True),
            startup_timeout_seconds=env.number(
                "RELAYQ_STARTUP_TIMEOUT_SECONDS", 30.0, maximum=3600),
            destination_policy=destination_policy(env),
            keyring=secret_keys(env),
            console=ConsoleConfig.from_env(env, server.tls),
        )
