"""Versioned schema migrations: numbered plain-SQL files in jobsdb/migrations/.

All pending migrations are applied in one transaction under an advisory lock, so any number
of processes may start at once: the first applies them, the others wait and find nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, LiteralString, cast

import backoff
from psycopg import AsyncConnection

from jobsdb import errors, locks, partitions
from jobsdb.pool import connection

log = logging.getLogger(__name__)

_FILENAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: LiteralString


def available() -> list[Migration]:
    found = []
    for entry in resources.files("jobsdb").joinpath("migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if match:
            # Shipped with the package and reviewed like code (see sqlfile.py).
            text = cast(LiteralString, entry.read_text(encoding="utf-8"))  # type: ignore[redundant-cast]
            found.append(Migration(int(match.group(1)), match.group(2), text))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number: {versions}")
    return found


async def migrate(conn: AsyncConnection[Any]) -> list[Migration]:
    """Apply every pending migration and make sure the current job partitions exist.

    Runs its own transactions on `conn`, which must not be inside one. Returns what it applied.
    """
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (locks.MIGRATIONS,))
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS relayq_migrations (
                version     integer PRIMARY KEY,
                name        text NOT NULL,
                applied_at  timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        cur = await conn.execute("SELECT version FROM relayq_migrations")
        done = {row[0] for row in await cur.fetchall()}
        for migration in available():
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO relayq_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration)
    await partitions.ensure(conn)
    return applied


async def current_version(conn: AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT to_regclass('relayq_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM relayq_migrations")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def prepare(dsn: str, *, apply: bool, wait_seconds: float, application_name: str
                  ) -> partitions.Settings:
    """What every process does at start: wait for Postgres (up to `wait_seconds`), apply
    migrations if `apply` (else insist they were applied), and read the cluster settings.

    Only a Postgres that does not answer (refused TCP connections, starting up, too many
    clients) is waited for: one that refuses us (no such database, wrong password) raises
    DatabaseRefused at once, with its own message. Raises DatabaseUnavailable if Postgres
    does not answer in time and SchemaOutdated if the schema is behind and `apply` is false.
    """
    deadline = time.monotonic() + wait_seconds
    waits = backoff.expo(base=2, factor=0.1, max_value=2)
    next(waits)
    while True:
        try:
            async with connection(dsn, application_name=application_name,
                                  autocommit=True) as conn:
                if apply:
                    await migrate(conn)
                else:
                    have, want = await current_version(conn), available()[-1].version
                    if have < want:
                        raise SchemaOutdated(
                            f"database schema is at version {have}, this release needs {want};"
                            " run `relayq migrate` (or set RELAYQ_MIGRATE=true)"
                        )
                return await partitions.settings(conn)
        except errors.DatabaseUnavailable as exc:
            pause = next(waits)
            if time.monotonic() + pause > deadline:
                raise errors.DatabaseUnavailable(
                    f"Postgres did not answer within {wait_seconds:.0f}s: {exc}") from exc
            log.info("waiting for Postgres: %s", exc)
            await asyncio.sleep(pause)


class SchemaOutdated(errors.JobsDBError):
    """The database needs migrations this process was told not to apply."""
