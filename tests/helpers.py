"""Small builders several test modules share (a test module never imports another)."""

from __future__ import annotations

import json
from typing import Any

from psycopg import AsyncConnection

from relayq.v1 import ingest_pb2


def event(message_id: str, user: str = "u1", **properties: Any) -> ingest_pb2.Event:
    return ingest_pb2.Event(
        message_id=message_id,
        user_id=user,
        type="track",
        event="Order Completed",
        payload_json=json.dumps(properties or {"n": 1}),
    )


def auth(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer credential (a write key or an admin token)."""
    return (("authorization", f"Bearer {token}"),)


async def count(conn: AsyncConnection[Any], table: str) -> int:
    cur = await conn.execute(f"SELECT count(*) FROM {table}")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])
