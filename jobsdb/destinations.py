"""Every destination at once, as the router loads them on start and on each configuration
change (ten thousand rows are one quick query). The rows are jobsdb.catalog.Destination, as the
admin service reads them one at a time."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from jobsdb.catalog import Destination
from jobsdb.sqlfile import query


async def load_all(conn: AsyncConnection[Any]) -> dict[int, Destination]:
    cur = await conn.execute(query("destinations.sql", "load_all"))
    rows = [Destination(*row) for row in await cur.fetchall()]
    return {row.destination_key: row for row in rows}
