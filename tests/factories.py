"""Configuration rows for tests, written with plain SQL (no service needed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, sql

from jobsdb import catalog
from jobsdb.ingest import NewEvent, store_events
from jobsdb.keys import hash_secret, new_secret


@dataclass(frozen=True)
class Source:
    id: str
    key: int
    tenant_key: int
    write_key: str


async def tenant(conn: AsyncConnection[Any], tenant_id: str = "acme") -> int:
    cur = await conn.execute(
        "INSERT INTO tenants (id, name) VALUES (%s, %s) RETURNING tenant_key",
        (tenant_id, tenant_id.title()),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def source(conn: AsyncConnection[Any], tenant_key: int, source_id: str = "web") -> Source:
    cur = await conn.execute(
        "INSERT INTO sources (id, tenant_key) VALUES (%s, %s) RETURNING source_key",
        (source_id, tenant_key),
    )
    row = await cur.fetchone()
    assert row is not None
    write_key = new_secret("rq_wk_")
    await conn.execute(
        "INSERT INTO write_keys (key_hash, source_key) VALUES (%s, %s)",
        (hash_secret(write_key), row[0]),
    )
    return Source(source_id, int(row[0]), tenant_key, write_key)


async def destination(
    conn: AsyncConnection[Any],
    tenant_key: int,
    destination_id: str,
    *,
    endpoint: str = "http://127.0.0.1:9/",
    kind: str = "webhook",
    **columns: Any,
) -> int:
    names = ["id", "tenant_key", "type", "endpoint", *columns]
    values = [destination_id, tenant_key, kind, endpoint, *columns.values()]
    statement = sql.SQL("INSERT INTO destinations ({}) VALUES ({}) RETURNING destination_key")
    cur = await conn.execute(
        statement.format(
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(sql.Placeholder() * len(values)),
        ),
        values,
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def connect(conn: AsyncConnection[Any], source_key: int, destination_key: int,
                  *, enabled: bool = True) -> None:
    await conn.execute(
        "INSERT INTO connections (source_key, destination_key, enabled) VALUES (%s, %s, %s)",
        (source_key, destination_key, enabled),
    )


async def insert_jobs(conn: AsyncConnection[Any], count: int, *, start: int | None = None
                      ) -> list[int]:
    """`count` jobs of one destination with rows of their own (pending, as released waiters
    are: the row path), users u0, u1, ..., their events from event id `start` on."""
    tenant_key = await tenant(conn, f"t{start or 0}")
    made = await source(conn, tenant_key, f"s{start or 0}")
    destination_key = await destination(conn, tenant_key, f"d{start or 0}")
    await connect(conn, made.key, destination_key)
    if start is not None:
        await conn.execute("SELECT setval('events_event_id_seq', %s)", (start,))
    events = [
        NewEvent(made.key, tenant_key, f"m{i}", f"u{i}", '{"n": 1}', (destination_key,))
        for i in range(count)
    ]
    async with conn.transaction():
        stored = await store_events(conn, events, ordering_partitions=64)
        return await pending_rows(conn, [s.event_id for s in stored if s.event_id])


async def pending_rows(conn: AsyncConnection[Any], event_ids: list[int]) -> list[int]:
    """Pending rows (as a released waiter has: the row path) for these events at every
    destination they are addressed to; returns the job ids in job order."""
    cur = await conn.execute(
        "INSERT INTO jobs (job_id, destination_key, tenant_key, source_key,"
        " ordering_partition, state, created_at, user_id, message_id)"
        " SELECT (e.event_id << 16) | c.slot, c.destination_key, e.tenant_key,"
        " e.source_key, e.ordering_partition, 'pending', e.created_at, e.user_id,"
        " e.message_id FROM events e JOIN connections c ON c.source_key = e.source_key"
        "  AND (e.destinations IS NULL OR c.destination_key = ANY(e.destinations))"
        " WHERE e.event_id = ANY(%s) ORDER BY 1 RETURNING job_id", (event_ids,))
    return sorted(int(r[0]) for r in await cur.fetchall())


async def admin_token(conn: AsyncConnection[Any], tenant_id: str) -> str:
    """A tenant-scoped admin token's secret."""
    tenant = await catalog.get_tenant(conn, tenant_id, None)
    _, secret = await catalog.create_admin_token(conn, tenant, f"{tenant_id}-token", "tests")
    return secret
