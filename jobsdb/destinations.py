"""Every destination at once, as the router loads them on start and on each configuration
change (ten thousand rows are one quick query). The rows are jobsdb.catalog.Destination, read
through the same view (destination_rows) as the admin service reads them one at a time."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row

from jobsdb.catalog import Destination, SigningSecret
from jobsdb.sqlfile import query


async def load_all(conn: AsyncConnection[Any]) -> dict[int, Destination]:
    """Each destination with its signing secrets in force (which only the router reads)."""
    cur = conn.cursor(row_factory=class_row(Destination))
    await cur.execute(query("destinations.sql", "load_all"))
    rows = {row.destination_key: row for row in await cur.fetchall()}
    secrets: defaultdict[int, list[SigningSecret]] = defaultdict(list)
    for key, secret, expires_at in await (
            await conn.execute(query("destinations.sql", "load_signing_secrets"))).fetchall():
        secrets[key].append(SigningSecret(secret, expires_at))
    for key, found in secrets.items():
        if key in rows:
            rows[key] = dataclasses.replace(rows[key], signing_secrets=tuple(found))
    return rows
