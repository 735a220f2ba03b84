"""Every destination at once, as the router loads them on start and on each configuration
change (ten thousand rows are one quick query). The rows are jobsdb.catalog.Destination, read
through the same view (destination_rows) as the admin service reads them one at a time."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import kwargs_row

from jobsdb.catalog import Destination, SigningSecret
from jobsdb.sqlfile import query


async def load_all(conn: AsyncConnection[Any]) -> dict[int, Destination]:
    """Each destination with its signing secrets in force (which only the router reads).

    The secrets are read first and go into each row as it is made: copying ten thousand
    frozen rows afterwards (dataclasses.replace) took 40% of a load that runs on the router's
    event loop at every configuration change."""
    secrets: defaultdict[int, list[SigningSecret]] = defaultdict(list)
    for key, secret, expires_at in await (
            await conn.execute(query("destinations.sql", "load_signing_secrets"))).fetchall():
        secrets[key].append(SigningSecret(secret, expires_at))
    found = {key: tuple(values) for key, values in secrets.items()}

    def destination(**columns: Any) -> Destination:
        return Destination(**columns, signing_secrets=found.get(columns["destination_key"], ()))

    cur = conn.cursor(row_factory=kwargs_row(destination))
    await cur.execute(query("destinations.sql", "load_all"), binary=True)
    return {row.destination_key: row for row in await cur.fetchall()}
