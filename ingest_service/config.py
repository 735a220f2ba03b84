"""relayq-ingest's configuration, read once from RELAYQ_* variables and validated at start."""

from __future__ import annotations

from dataclasses import dataclass

from jobsdb import maintenance
from relayq.client import limits as defaults
from relayq.config import Env, ServerConfig, maintenance_policy, workers


@dataclass(frozen=True)
class Limits:
    max_batch_events: int
    max_event_bytes: int
    max_request_bytes: int


@dataclass(frozen=True)
class IngestConfig:
    database_url: str
    server: ServerConfig
    limits: Limits
    # Group commit: a flush waits at most this long for more requests to join it ...
    flush_delay_seconds: float
    # ... and takes at most this many jobs.
    flush_max_jobs: int
    # Flushes in flight at once, each on its own connection (plus the committer's express
    # slot, which flushes only requests of sources sending now and then).
    flush_concurrency: int
    pool_size: int
    route_cache_seconds: float
    migrate: bool
    maintenance: maintenance.Policy | None
    startup_timeout_seconds: float
    # Processes serving the port (relayq.supervisor); 1: this process alone.
    workers: int = 1

    @classmethod
    def from_env(cls, env: Env | None = None) -> IngestConfig:
        env = env or Env()
        flush_concurrency = env.integer("RELAYQ_INGEST_FLUSH_CONCURRENCY", 2, minimum=1, maximum=64)
        return cls(
            database_url=env.database_url(),
            server=ServerConfig.from_env(env, "ingest", 50051, 9151),
            limits=Limits(
                max_batch_events=env.integer(
                    "RELAYQ_INGEST_MAX_BATCH_EVENTS", defaults.MAX_BATCH_EVENTS, minimum=1,
                    maximum=100_000),
                max_event_bytes=env.integer(
                    "RELAYQ_INGEST_MAX_EVENT_BYTES", defaults.MAX_EVENT_BYTES, minimum=256,
                    maximum=16 * 1024 * 1024),
                max_request_bytes=env.integer(
                    "RELAYQ_INGEST_MAX_REQUEST_BYTES", defaults.MAX_REQUEST_BYTES, minimum=1024,
                    maximum=1024 * 1024 * 1024),
            ),
            flush_delay_seconds=env.number(
                "RELAYQ_INGEST_FLUSH_DELAY_MS", 2.0, maximum=1000) / 1000,
            flush_max_jobs=env.integer(
                "RELAYQ_INGEST_FLUSH_MAX_JOBS", 5000, minimum=1, maximum=1_000_000),
            flush_concurrency=flush_concurrency,
            pool_size=env.integer(
                "RELAYQ_INGEST_POOL_SIZE", flush_concurrency + 3, minimum=flush_concurrency + 1,
                maximum=1000),
            route_cache_seconds=env.number(
                "RELAYQ_INGEST_ROUTE_CACHE_SECONDS", 5.0, maximum=3600),
            migrate=env.flag("RELAYQ_MIGRATE", True),
            maintenance=maintenance_policy(env),
            startup_timeout_seconds=env.number(
                "RELAYQ_STARTUP_TIMEOUT_SECONDS", 30.0, maximum=3600),
            workers=workers(env, "RELAYQ_INGEST_WORKERS", "auto"),
        )
