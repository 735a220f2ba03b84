"""Small builders several test modules share (a test module never imports another)."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import standardwebhooks
from psycopg import AsyncConnection

from jobsdb import leases, queue
from jobsdb.queue import Outcome
from relayq.netpolicy import NetworkPolicy
from relayq.v1 import ingest_pb2
from router_service.resolver import Resolver
from tests.sinks import Received

# The key the services under test seal secrets with (RELAYQ_SECRET_KEYS; jobsdb.sealing).
TEST_SECRET_KEY = "dGVzdC1rZXktZm9yLXJlbGF5cS1zZWFsaW5nLTAwMDE="

# Tests send only to this machine, and loopback is refused to destinations by default
# (relayq.netpolicy): every router and admin under test allows it, and nothing else.
LOOPBACK_NETWORKS = "127.0.0.0/8,::1/128"


def loopback_resolver() -> Resolver:
    """A router's resolver allowing loopback, as the services under test have it."""
    return Resolver(NetworkPolicy.parse(LOOPBACK_NETWORKS))

# When the tests' outcomes say their attempts started.
NOW = datetime.now(UTC)


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


def outcome(job_id: int, state: queue.State, attempt: int = 1, **kw: Any) -> Outcome:
    return Outcome(job_id=job_id, attempt=attempt, state=state, started_at=NOW, duration_ms=3,
                   **kw)


async def owners(conn: AsyncConnection[Any]) -> dict[str, int]:
    """How many ordering-key partitions each router holds ("" for the unowned)."""
    counts: dict[str, int] = defaultdict(int)
    for owner in (await leases.owners(conn)).values():
        counts[owner or ""] += 1
    return dict(counts)


def first_deliveries_in_order(ids_by_user: dict[str, list[int]], oks: list[Received]) -> None:
    """At-least-once: duplicates may follow a crash, but each user's first successful
    deliveries are exactly that user's jobs in ingest order."""
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for delivery in oks:
        if delivery.job_id not in seen:
            seen.add(delivery.job_id)
            firsts[delivery.user_id].append(delivery.job_id)
    assert dict(firsts) == dict(ids_by_user)


def verifies(secret: str, delivery: Received) -> bool:
    """The delivery carries a Standard Webhooks signature by `secret` (checked by the
    reference verifier)."""
    try:
        standardwebhooks.Webhook(secret).verify(delivery.raw, delivery.headers)
    except standardwebhooks.WebhookVerificationError:
        return False
    return True
