"""The write-key lookup on the ingest path: which source a key belongs to, and where that
source's events go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from jobsdb.keys import hash_secret
from jobsdb.sqlfile import query


@dataclass(frozen=True, slots=True)
class SourceRoute:
    source_key: int
    source_id: str
    tenant_key: int
    tenant_id: str
    enabled: bool
    # Events per second ingest takes from the source (0: unlimited), and the burst.
    rate_per_second: float
    rate_burst: int
    # Connected destinations, in destination_key order: public id -> key.
    destinations: dict[str, int]
    # The same keys, in the same order: every event without named destinations goes to all.
    destination_keys: tuple[int, ...]


async def source_for_write_key(conn: AsyncConnection[Any], write_key: str) -> SourceRoute | None:
    """The source a write key belongs to, or None if the key is unknown, revoked or expired."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("write_keys.sql", "source_for_write_key"),
                      {"key_hash": hash_secret(write_key)})
    row = await cur.fetchone()
    if row is None:
        return None
    keys, ids = row.pop("destination_keys"), row.pop("destination_ids")
    return SourceRoute(**row, destinations=dict(zip(ids, keys, strict=True)),
                       destination_keys=tuple(keys))
