"""Connection pools and the transaction boundary every service uses."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from jobsdb import errors, health

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


class _Connection(AsyncConnection[Any]):
    """A pool's connection that reports a failed connect (refused, too many clients, the
    server gone) to jobsdb.health, and keeps its reason for a request that then finds no
    connection (PoolTimeout says only that it waited)."""

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
        try:
            conn = await super().connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            failure = errors.translate(exc)
            _last_connect_error[str(kwargs.get("application_name"))] = str(failure)
            health.STATE.failed(failure)
            raise
        _last_connect_error.pop(str(kwargs.get("application_name")), None)
        return conn


# Per pool (by its application name): why its last connect failed, while it does.
_last_connect_error: dict[str, str] = {}
UNREACHABLE_CHECKOUT_SECONDS = 1.0


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
        connection_class=_Connection,
        name=application_name,
        open=False,
    )
    await pool.open(wait=False)
    _POOLS.add(pool)
    return pool


@asynccontextmanager
async def transaction(pool: AsyncConnectionPool) -> AsyncIterator[AsyncConnection[Any]]:
    """A connection in a transaction: committed if the block succeeds, rolled back if it raises.

    Driver errors leave as jobsdb errors (errors.translate), so callers handle one family;
    those the database's state explains are reported to jobsdb.health.
    """
    # A pool whose last connect failed (Postgres refuses, or is gone) is unlikely to get one
    # within its checkout timeout: answer within a second, with the reason, rather than keep
    # a client waiting the whole timeout (its deadline may be shorter).
    wait = UNREACHABLE_CHECKOUT_SECONDS if pool.name in _last_connect_error else None
    try:
        async with pool.connection(timeout=wait) as conn:
            yield conn
    except PoolTimeout as exc:
        reason = _last_connect_error.get(pool.name)
        failure = (errors.DatabaseUnavailable(f"no database connection available: {reason}")
                   if reason else errors.translate(exc))
        health.STATE.failed(failure)
        raise failure from exc
    except psycopg.Error as exc:
        failure = errors.translate(exc)
        health.STATE.failed(failure)
        raise failure from exc


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
