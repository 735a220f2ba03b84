"""Reading configuration from RELAYQ_* environment variables.

Every service builds one frozen, validated config object at start; a bad value stops the
process there with a message naming the variable, not at 3 a.m. on first use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from jobsdb import maintenance, sealing
from relayq import cpus, netpolicy, worker


class ConfigError(Exception):
    """A configuration variable is missing or malformed. The message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


class Env:
    """Typed access to a mapping of environment variables (os.environ by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    @property
    def environ(self) -> Mapping[str, str]:
        return self._environ

    def text(self, name: str, default: str) -> str:
        return self._environ.get(name, default).strip() or default

    def integer(self, name: str, default: int, *, minimum: int = 0,
                maximum: int = 2**31 - 1) -> int:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(name, f"{value} is outside {minimum}..{maximum}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0,
              maximum: float = float("inf")) -> float:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, f"expected a number, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(name, f"{value} is outside {minimum}..{maximum}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._environ.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"expected true or false, got {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def address(self, name: str, default: str) -> str:
        """host:port; port 0 lets the system choose (tests)."""
        value = self.text(name, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(name, f"expected host:port, got {value!r}")
        return value

    def optional_address(self, name: str, default: str) -> str | None:
        """Like address(), but 'off' (or 'none', '0') disables the listener."""
        if self._environ.get(name, "").strip().lower() in ("off", "none", "0", "disabled"):
            return None
        return self.address(name, default)

    def file(self, name: str) -> Path | None:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return None
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(name, f"no readable file at {raw!r}")
        return path

    def database_url(self) -> str:
        """RELAYQ_DATABASE_URL (a libpq DSN or URL); libpq's PG* variables when it is unset."""
        url = self._environ.get("RELAYQ_DATABASE_URL", "").strip()
        if url:
            return url
        if any(self._environ.get(v) for v in ("PGHOST", "PGDATABASE", "PGSERVICE")):
            return ""
        raise ConfigError(
            "RELAYQ_DATABASE_URL",
            "not set; give a libpq DSN such as postgresql://user@127.0.0.1:5432/relayq",
        )


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path

    @classmethod
    def from_env(cls, env: Env) -> TLSConfig | None:
        cert = env.file("RELAYQ_TLS_CERT_FILE")
        key = env.file("RELAYQ_TLS_KEY_FILE")
        if cert is None and key is None:
            return None
        if cert is None:
            raise ConfigError("RELAYQ_TLS_CERT_FILE", "RELAYQ_TLS_KEY_FILE is set but this is not")
        if key is None:
            raise ConfigError("RELAYQ_TLS_KEY_FILE", "RELAYQ_TLS_CERT_FILE is set but this is not")
        return cls(cert_file=cert, key_file=key)


@dataclass(frozen=True)
class ServerConfig:
    """What every relayq process serves: a gRPC port and a metrics port."""

    address: str
    metrics_address: str | None
    tls: TLSConfig | None
    grace_seconds: float
    # The variables the two addresses came from, so that a port that cannot be bound is
    # reported as the setting to change.
    address_variable: str = "address"
    metrics_variable: str = "metrics address"
    # A worker of a supervisor (relayq.supervisor): binds the gRPC port with SO_REUSEPORT,
    # beside the other workers. Otherwise a port someone else listens on is refused.
    share_port: bool = False

    @classmethod
    def from_env(cls, env: Env, service: str, default_port: int, default_metrics_port: int
                 ) -> ServerConfig:
        prefix = f"RELAYQ_{service.upper()}"
        return cls(
            address=env.address(f"{prefix}_ADDRESS", f"127.0.0.1:{default_port}"),
            metrics_address=env.optional_address(
                f"{prefix}_METRICS_ADDRESS", f"127.0.0.1:{default_metrics_port}"
            ),
            tls=TLSConfig.from_env(env),
            grace_seconds=env.number("RELAYQ_SHUTDOWN_GRACE_SECONDS", 10.0, maximum=600),
            address_variable=f"{prefix}_ADDRESS",
            metrics_variable=f"{prefix}_METRICS_ADDRESS",
            share_port=worker.index(env.environ) is not None,
        )


MAX_WORKERS = 64


def workers(env: Env, variable: str, default: str) -> int:
    """How many processes serve (RELAYQ_INGEST_WORKERS, RELAYQ_ROUTER_WORKERS): a number, or
    `auto`: one per CPU this process may use (relayq.cpus). docs/operations.md says which
    default each service has, measured, and when to choose otherwise."""
    raw = env.text(variable, default).lower()
    if raw == "auto":
        return min(MAX_WORKERS, cpus.usable())
    if not raw.isdigit():
        raise ConfigError(variable, f"expected a whole number or auto, got {raw!r}")
    return env.integer(variable, 1, minimum=1, maximum=MAX_WORKERS)


def maintenance_policy(env: Env) -> maintenance.Policy | None:
    """The housekeeping every ingest and router process offers to run (one at a time does):
    None when RELAYQ_MAINTENANCE is off. Read the same way by both, so they cannot disagree."""
    policy = maintenance.Policy(
        dedupe_window=timedelta(seconds=env.integer(
            "RELAYQ_DEDUPE_WINDOW_SECONDS", 3600, minimum=60, maximum=30 * 86400)),
        retention=timedelta(seconds=env.integer(
            "RELAYQ_RETENTION_SECONDS", 86400, minimum=60, maximum=3650 * 86400)),
        event_retention=timedelta(seconds=env.integer(
            "RELAYQ_EVENT_RETENTION_SECONDS", 7 * 86400, minimum=60, maximum=3650 * 86400)),
        compact_below=env.integer("RELAYQ_COMPACT_BELOW_JOBS", 10_000, minimum=0,
                                  maximum=100_000_000),
    )
    return policy if env.flag("RELAYQ_MAINTENANCE", True) else None


def destination_policy(env: Env) -> netpolicy.NetworkPolicy:
    """Where destinations may connect (relayq.netpolicy): public addresses, and the networks
    in RELAYQ_DESTINATION_ALLOW_NETWORKS. Read the same way by the router, which checks every
    address it connects to, and the admin service, which refuses literal addresses early."""
    variable = netpolicy.ALLOW_VARIABLE
    try:
        return netpolicy.NetworkPolicy.parse(env.environ.get(variable, ""))
    except ValueError as exc:
        raise ConfigError(variable, str(exc)) from None


def secret_keys(env: Env) -> sealing.Keyring:
    """RELAYQ_SECRET_KEYS: the keys secrets are sealed under at rest (jobsdb.sealing), the
    first sealing, all opening. Required where secrets are read or written (router, admin)."""
    try:
        return sealing.Keyring.parse(env.environ.get(sealing.VARIABLE, ""))
    except ValueError as exc:
        raise ConfigError(sealing.VARIABLE, str(exc)) from None
