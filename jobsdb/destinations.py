"""Every destination at once, as the router loads them on start and on each configuration
change (ten thousand rows are one quick query). The rows are jobsdb.catalog.Destination, read
through the same view (destination_rows) as the admin service reads them one at a time."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row

from jobsdb.catalog import Destination
from jobsdb.sqlfile import query


async def load_all(conn: AsyncConnection[Any]) -> dict[int, Destination]:
    cur = conn.cursor(row_factory=class_row(Destination))
    await cur.execute(query("destinations.sql", "load_all"))
    return {row.destination_key: row for row in await cur.fetchall()}
