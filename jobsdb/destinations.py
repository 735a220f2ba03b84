"""Every destination at once, as the router loads them on start and on each configuration
change (ten thousand rows are one quick query). The rows are jobsdb.catalog.Destination, read
through the same view (destination_rows) as the admin service reads them one at a time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import kwargs_row

from jobsdb.catalog import Destination, SigningSecret
from jobsdb.sqlfile import query


async def load_all(conn: AsyncConnection[Any]) -> dict[int, Destination]:
    """Each destination with its signing secrets in force (which only the router reads).

    This runs on the router's event loop at every configuration change, so each row is made
    once, secrets included: copying ten thousand frozen rows afterwards to add their secrets
    (dataclasses.replace) took 40% of it under cProfile."""

    def destination(secrets: list[str], expiries: list[datetime | None],
                    **columns: Any) -> Destination:
        return Destination(**columns,
                           signing_secrets=tuple(map(SigningSecret, secrets, expiries)))

    cur = conn.cursor(row_factory=kwargs_row(destination))
    await cur.execute(query("destinations.sql", "load_all"), binary=True)
    return {row.destination_key: row for row in await cur.fetchall()}
