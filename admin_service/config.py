"""relayq-admin's configuration, read once from RELAYQ_* variables and validated at start."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobsdb import sealing
from relayq.auth import operator_token
from relayq.config import Env, ServerConfig, destination_policy, secret_keys
from relayq.netpolicy import NetworkPolicy


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

    @classmethod
    def from_env(cls, env: Env | None = None) -> AdminConfig:
        env = env or Env()
        token = operator_token(env, required=True)
        assert token is not None
        return cls(
            database_url=env.database_url(),
            server=ServerConfig.from_env(env, "admin", 50052, 9152),
            operator_token=token,
            pool_size=env.integer("RELAYQ_ADMIN_POOL_SIZE", 4, minimum=1, maximum=100),
            statement_timeout_ms=env.integer(
                "RELAYQ_ADMIN_STATEMENT_TIMEOUT_MS", 30_000, minimum=100, maximum=3_600_000),
            migrate=env.flag("RELAYQ_MIGRATE", True),
            startup_timeout_seconds=env.number(
                "RELAYQ_STARTUP_TIMEOUT_SECONDS", 30.0, maximum=3600),
            destination_policy=destination_policy(env),
            keyring=secret_keys(env),
        )
