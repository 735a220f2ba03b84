"""Write key -> source route, cached: the hot path must not ask Postgres on every request.

Entries live for a few seconds, and any configuration change (a NOTIFY on relayq_config)
clears them all, so a revoked key stops working within moments on every ingest process.
"""

from __future__ import annotations

import asyncio
import time

from psycopg_pool import AsyncConnectionPool

from jobsdb import write_keys
from jobsdb.pool import transaction
from jobsdb.write_keys import SourceRoute

# Unknown keys are remembered briefly too (a misconfigured client retrying in a loop should
# not cost a query per request), but a bounded number of them.
_NEGATIVE_TTL = 1.0
_MAX_ENTRIES = 10_000


class RouteCache:
    def __init__(self, pool: AsyncConnectionPool, ttl_seconds: float) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._entries: dict[str, tuple[float, SourceRoute | None]] = {}
        self._loading: dict[str, asyncio.Future[SourceRoute | None]] = {}
        # Bumped by every invalidation: a load that began before one may have read the old
        # configuration, so it answers its waiters but is not kept.
        self._generation = 0

    async def get(self, write_key: str) -> SourceRoute | None:
        entry = self._entries.get(write_key)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        loading = self._loading.get(write_key)
        if loading is not None:  # one query per key, however many requests wait for it
            return await asyncio.shield(loading)
        future: asyncio.Future[SourceRoute | None] = asyncio.get_running_loop().create_future()
        self._loading[write_key] = future
        generation = self._generation
        try:
            async with transaction(self._pool) as conn:
                route = await write_keys.source_for_write_key(conn, write_key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._loading[write_key]
        future.set_result(route)
        if generation != self._generation:
            return route
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        ttl = self._ttl if route is not None else min(self._ttl, _NEGATIVE_TTL)
        self._entries[write_key] = (time.monotonic() + ttl, route)
        return route

    def invalidate(self, _payload: str = "") -> None:
        self._generation += 1
        self._entries.clear()
