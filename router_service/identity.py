"""One live router per router id, proven by a lock its Postgres session holds.

Partition leases are owned by router id. A router restarted under its old id (the default id is
stable per host and port) finds its leases unexpired and renews them on its first heartbeat,
so it delivers again within moments of starting instead of waiting the old lease out. That is
only safe if the old process is gone: two live routers under one id would both deliver the
same keys. The identity lock says so. The router's own connection holds it for as long as the
router runs, and Postgres releases it the moment that session ends (a killed process's socket
closes at once), so a router that gets it knows no other live process has its id; one that
cannot get it refuses to start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg
from psycopg import AsyncConnection

from jobsdb import errors, leases
from jobsdb.pool import connect_kwargs

log = logging.getLogger(__name__)


class IdentityInUse(errors.JobsDBError):
    """Another live router holds this router id."""


class Identity:
    def __init__(self, dsn: str, router_id: str, *, application_name: str) -> None:
        self._dsn = dsn
        self.router_id = router_id
        self._application_name = application_name
        self._conn: AsyncConnection[Any] | None = None

    async def claim(self, wait: float) -> None:
        """Take the id, waiting up to `wait` seconds for a previous process's session to end
        (a process killed a moment ago may not have been noticed by Postgres yet)."""
        deadline = time.monotonic() + wait
        while not await self._try():
            if time.monotonic() >= deadline:
                raise IdentityInUse(
                    f"RELAYQ_ROUTER_ID={self.router_id}: another running router uses this id"
                    " (its database session holds the id's lock); give each router its own")
            await asyncio.sleep(0.2)

    async def held(self) -> bool:
        """Is the id still ours? If our session was lost (Postgres restarted, the network
        broke), take it again; False if another router took it meanwhile, or Postgres cannot
        be reached to tell."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return True
        try:
            if await self._try():
                log.info("router id lock taken again", extra={"router": self.router_id})
                return True
        except errors.JobsDBError as exc:
            log.warning("cannot confirm the router id lock: %s", exc,
                        extra={"router": self.router_id})
            return False
        log.error("another running router took this router id; this one stops delivering",
                  extra={"router": self.router_id})
        return False

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _try(self) -> bool:
        await self.release()
        try:
            conn = await AsyncConnection.connect(
                self._dsn, autocommit=True, **connect_kwargs(self._application_name))
        except psycopg.Error as exc:
            raise errors.translate(exc) from exc
        try:
            taken = await leases.claim_identity(conn, self.router_id)
        except psycopg.Error as exc:
            await conn.close()
            raise errors.translate(exc) from exc
        if not taken:
            await conn.close()
            return False
        self._conn = conn
        return True
