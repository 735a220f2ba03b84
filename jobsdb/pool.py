"""Connection pools and the transaction boundary every service uses."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobsdb import errors

# Sessions of relayq never sit idle inside a transaction (a stuck one would hold back vacuum
# and every lock it took), and a connection whose peer vanished is noticed within ~20 s.
SESSION_OPTIONS = "-c idle_in_transaction_session_timeout=60000"
KEEPALIVES = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 2,
}


# Every pool open_pool made in this process, for whoever reports on them (relayq.poolmetrics).
_POOLS: weakref.WeakSet[AsyncConnectionPool] = weakref.WeakSet()


def open_pools() -> list[AsyncConnectionPool]:
    """The pools this process opened and has not closed."""
    return [pool for pool in list(_POOLS) if not pool.closed]


def connect_kwargs(application_name: str, statement_timeout_ms: int | None = None
                   ) -> dict[str, Any]:
    options = SESSION_OPTIONS
    if statement_timeout_ms is not None:
        options += f" -c statement_timeout={int(statement_timeout_ms)}"
    return {
        "application_name": application_name,
        "options": options,
        "connect_timeout": 5,
        **KEEPALIVES,
    }


async def open_pool(
    dsn: str,
    *,
    application_name: str,
    min_size: int = 1,
    max_size: int = 8,
    checkout_seconds: float = 5.0,
    check: bool = True,
    statement_timeout_ms: int | None = None,
) -> AsyncConnectionPool:
    """Open a pool without waiting for Postgres: a service may start before its database.

    With `check`, each connection is tested on checkout, so after a Postgres restart a request
    gets a fresh connection instead of a broken one. It costs a round trip per checkout; a hot
    path that cannot afford it passes check=False and retries once on DatabaseUnavailable
    (a broken connection is discarded when it goes back to the pool).
    """
    pool: AsyncConnectionPool = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=checkout_seconds,
        kwargs=connect_kwargs(application_name, statement_timeout_ms),
        check=AsyncConnectionPool.check_connection if check else None,
        reconnect_timeout=float("inf"),
        name=application_name,
        open=False,
    )
    await pool.open(wait=False)
    _POOLS.add(pool)
    return pool


@asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection in a transaction: committed if the block succeeds, rolled back if it raises.

    Driver errors leave as jobsdb errors (errors.translate), so callers handle one family.
    """
    try:
        async with pool.connection() as conn:
            yield conn
    except (psycopg.Error, PoolTimeout) as exc:
        raise errors.translate(exc) from exc


@asynccontextmanager
async def connection(dsn: str, *, application_name: str, autocommit: bool = False
                     ) -> AsyncIterator[AsyncConnection[Any]]:
    """One connection outside any pool (migrations, maintenance, LISTEN), errors translated."""
    try:
        conn = await AsyncConnection.connect(
            dsn, autocommit=autocommit, **connect_kwargs(application_name)
        )
    except psycopg.Error as exc:
        raise errors.translate(exc) from exc
    try:
        async with conn:
            yield conn
    except psycopg.Error as exc:
        raise errors.translate(exc) from exc
