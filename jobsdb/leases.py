"""Router membership and partition leases (see migrations/0002_router.sql).

Every function runs one statement; the router's membership loop (router_service.membership)
calls them in one short transaction per heartbeat.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import class_row

from jobsdb import locks
from jobsdb.sqlfile import query


@dataclass(frozen=True, slots=True)
class Membership:
    live_routers: int
    partitions: int
    # The database's clock when the heartbeat was written.
    at: datetime

    @property
    def fair_share(self) -> int:
        return math.ceil(self.partitions / max(1, self.live_routers))


@dataclass(frozen=True, slots=True)
class LiveRouter:
    router_id: str
    started_at: datetime
    heartbeat_at: datetime
    partitions: int


async def live_routers(conn: AsyncConnection[Any]) -> list[LiveRouter]:
    cur = conn.cursor(row_factory=class_row(LiveRouter))
    await cur.execute(query("leases.sql", "live_routers"))
    return await cur.fetchall()


async def claim_identity(conn: AsyncConnection[Any], router_id: str) -> bool:
    """Take the router id's session lock (see leases.sql); False if another session has it."""
    cur = await conn.execute(query("leases.sql", "claim_identity"),
                             {"namespace": locks.ROUTER_IDENTITY, "router_id": router_id})
    row = await cur.fetchone()
    return bool(row and row[0])


async def heartbeat(conn: AsyncConnection[Any], router_id: str, lease: timedelta) -> Membership:
    cur = conn.cursor(row_factory=class_row(Membership))
    await cur.execute(query("leases.sql", "heartbeat"), {"router_id": router_id, "lease": lease})
    row = await cur.fetchone()
    assert row is not None
    return row


async def renew(conn: AsyncConnection[Any], router_id: str, lease: timedelta) -> set[int]:
    cur = await conn.execute(query("leases.sql", "renew"), {"router_id": router_id, "lease": lease})
    return {int(r[0]) for r in await cur.fetchall()}


async def acquire(conn: AsyncConnection[Any], router_id: str, lease: timedelta, wanted: int
                  ) -> set[int]:
    if wanted <= 0:
        return set()
    cur = await conn.execute(query("leases.sql", "acquire"),
                             {"router_id": router_id, "lease": lease, "wanted": wanted})
    return {int(r[0]) for r in await cur.fetchall()}


async def release(conn: AsyncConnection[Any], router_id: str, partitions: Iterable[int]
                  ) -> set[int]:
    cur = await conn.execute(query("leases.sql", "release"),
                             {"router_id": router_id, "partitions": sorted(partitions)})
    return {int(r[0]) for r in await cur.fetchall()}


async def leave(conn: AsyncConnection[Any], router_id: str) -> None:
    await conn.execute(query("leases.sql", "leave"), {"router_id": router_id})


async def forget_dead(conn: AsyncConnection[Any]) -> None:
    await conn.execute(query("leases.sql", "forget_dead"))


async def owners(conn: AsyncConnection[Any]) -> dict[int, str | None]:
    cur = conn.cursor(row_factory=class_row(_Lease))
    await cur.execute(query("leases.sql", "owners"))
    return {row.partition: row.owner for row in await cur.fetchall()}


class _Lease(NamedTuple):
    partition: int
    owner: str | None
    expires_at: datetime | None
