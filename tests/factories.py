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
    """`count` jobs of one destination, users u0, u1, ..., from job id `start` on."""
    tenant_key = await tenant(conn, f"t{start or 0}")
    made = await source(conn, tenant_key, f"s{start or 0}")
    destination_key = await destination(conn, tenant_key, f"d{start or 0}")
    if start is not None:
        await conn.execute("SELECT setval('jobs_job_id_seq', %s)", (start,))
    events = [
        NewEvent(made.key, tenant_key, f"m{i}", f"u{i}", '{"n": 1}', (destination_key,))
        for i in range(count)
    ]
    async with conn.transaction():
        stored = await store_events(conn, events, ordering_partitions=64)
    return [j for s in stored for j in s.job_ids]


async def admin_token(conn: AsyncConnection[Any], tenant_id: str) -> str:
    """A tenant-scoped admin token's secret."""
    tenant = await catalog.get_tenant(conn, tenant_id, None)
    _, secret = await catalog.create_admin_token(conn, tenant, f"{tenant_id}-token", "tests")
    return secret
