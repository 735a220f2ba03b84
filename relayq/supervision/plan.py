"""What a service tells its supervisor (relayq.supervisor): the module each worker runs, how
many, what to do once before they start, and each worker's own variables."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from jobsdb import migrate
from relayq.config import ServerConfig


class Served(Protocol):
    @property
    def server(self) -> ServerConfig: ...


Config = TypeVar("Config", bound=Served)


def _nothing(config: Any, index: int) -> Mapping[str, str]:
    return {}


class Migrating(Protocol):
    @property
    def database_url(self) -> str: ...
    @property
    def migrate(self) -> bool: ...
    @property
    def startup_timeout_seconds(self) -> float: ...


def migrated(application_name: str) -> Callable[[Migrating], Awaitable[object]]:
    """A Plan's `prepare` for a service that waits for Postgres and migrates at start as
    every relayq service does (jobsdb.migrate.prepare)."""
    async def prepare(config: Migrating) -> object:
        return await migrate.prepare(config.database_url, apply=config.migrate,
                                     wait_seconds=config.startup_timeout_seconds,
                                     application_name=application_name)
    return prepare


@dataclass(frozen=True)
class Plan(Generic[Config]):
    """What a service tells its supervisor."""

    # Each worker runs `<module>.main()`.
    module: str
    # How many workers the configuration asks for.
    count: Callable[[Config], int]
    # Done once before any worker starts: wait for Postgres, migrate or check the schema.
    prepare: Callable[[Config], Awaitable[object]]
    # A worker's own variables, besides those every worker gets (a router's id).
    environment: Callable[[Config, int], Mapping[str, str]] = _nothing
