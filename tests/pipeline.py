"""A whole pipeline for tests: a tenant and source, real sinks, helpers to send and wait.

Registered as a pytest plugin in conftest.py, so the `world` fixture is available everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from psycopg import AsyncConnection

from relayq.v1 import ingest_pb2
from tests import factories
from tests.helpers import auth
from tests.services import Ingest
from tests.sinks import GrpcSink, WebhookSink

FAST_RETRIES = {"min_backoff_ms": 20, "max_backoff_ms": 200}


@dataclass
class World:
    conn: AsyncConnection[Any]
    database: str
    tenant: int
    source: factories.Source
    webhook: WebhookSink
    grpc_sink: GrpcSink

    async def destination(self, destination_id: str, *, kind: str = "webhook",
                          **columns: Any) -> int:
        endpoint = self.webhook.url if kind == "webhook" else self.grpc_sink.endpoint
        key = await factories.destination(self.conn, self.tenant, destination_id,
                                          endpoint=endpoint, kind=kind,
                                          **{**FAST_RETRIES, **columns})
        await factories.connect(self.conn, self.source.key, key)
        return key


@pytest.fixture
async def web(conn: AsyncConnection[Any]) -> factories.Source:
    """Source `web` of tenant acme, connected to one destination `d1` (nothing listens)."""
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    await factories.connect(conn, source.key, await factories.destination(conn, tenant, "d1"))
    return source


@pytest.fixture
async def world(database: str, conn: AsyncConnection[Any]) -> AsyncIterator[World]:
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    webhook, grpc_sink = WebhookSink(), GrpcSink()
    await webhook.start()
    await grpc_sink.start()
    try:
        yield World(conn, database, tenant, source, webhook, grpc_sink)
    finally:
        await webhook.stop()
        await grpc_sink.stop()


async def send(service: Ingest, source: factories.Source, events: list[ingest_pb2.Event]
               ) -> list[int]:
    """Ingest events in batches of 100; returns the job ids in order."""
    ids: list[int] = []
    for start in range(0, len(events), 100):
        response = await service.stub.Ingest(
            ingest_pb2.IngestRequest(events=events[start:start + 100]),
            metadata=auth(source.write_key), timeout=10)
        ids.extend(j for r in response.results for j in r.job_ids)
    return ids


async def states(conn: AsyncConnection[Any]) -> dict[int, str]:
    cur = await conn.execute("SELECT job_id, state::text FROM jobs")
    return {r[0]: r[1] for r in await cur.fetchall()}


async def wait_until_finished(conn: AsyncConnection[Any], count: int, within: float = 60
                              ) -> None:
    """Poll with a deadline until `count` jobs are succeeded or aborted."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        cur = await conn.execute(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'aborted')")
        done = (await cur.fetchone() or [0])[0]
        if done >= count:
            return
        if asyncio.get_running_loop().time() > deadline:
            cur = await conn.execute(
                "SELECT job_id, user_id, state::text, attempts, blocked_by, retry_at - now()"
                " FROM jobs WHERE state NOT IN ('succeeded', 'aborted') ORDER BY job_id LIMIT 20")
            stuck = "\n".join(str(r) for r in await cur.fetchall())
            raise TimeoutError(f"{done} of {count} jobs finished; unfinished:\n{stuck}")
        await asyncio.sleep(0.1)
