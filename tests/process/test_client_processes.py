"""relayq.client against a relayq-ingest process that is killed with SIGKILL mid-stream.

What a producer promises is checked where it matters: in Postgres (every event stored
exactly once, whatever was retried) and at a real webhook sink behind a real router (each
user's events arrive in send() order).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from relayq.client import Producer, SendResult
from relayq.ports import free_port
from tests.pipeline import World, wait_until_finished
from tests.poll import eventually
from tests.services import ServiceProcess, quiet_env, router

USERS = 20
EVENTS = 4000


def start_ingest(database: str, port: int) -> ServiceProcess:
    service = ServiceProcess("ingest_service.main",
                             quiet_env(database, RELAYQ_INGEST_ADDRESS=f"127.0.0.1:{port}"), port)
    service.wait_ready()
    return service


@pytest.mark.process
async def test_kill_9_of_ingest_mid_stream_loses_nothing_doubles_nothing_reorders_nothing(
    world: World
) -> None:
    await world.destination("hook")
    port = free_port()
    service = start_ingest(world.database, port)
    producer = Producer(address=f"127.0.0.1:{port}", write_key=world.source.write_key,
                        batch_events=50, linger_ms=5, in_flight=4, backoff_min=0.05,
                        backoff_max=0.5, delivery_timeout=120)
    handles = []
    done_sending = threading.Event()

    def send_steadily() -> None:
        """~2,000 events/s, so the kill lands while events are still being sent."""
        seq: Counter[str] = Counter()
        for start in range(0, EVENTS, 100):
            for i in range(start, start + 100):
                user = f"user-{i % USERS}"
                seq[user] += 1
                handles.append(producer.send(user_id=user, event="Step",
                                             properties={"seq": seq[user]}))
            time.sleep(0.05)  # noqa: TID251 - pacing the sender, not waiting for anything
        done_sending.set()

    sender = threading.Thread(target=send_steadily)
    try:
        async with router(world.database):
            sender.start()
            await eventually(lambda: producer.counters.accepted >= EVENTS // 4, within=60,
                             every=0.01, what="ingest to accept a quarter before the kill")
            service.kill()  # SIGKILL: batches in flight get no answer
            killed_at = producer.counters
            await asyncio.sleep(0.5)
            service.close()
            service = start_ingest(world.database, port)

            await asyncio.to_thread(sender.join, 60)
            assert done_sending.is_set()
            assert await asyncio.to_thread(producer.flush, 120)
            results: list[SendResult] = [h.result(0) for h in handles]
            await wait_until_finished(world.conn, EVENTS, within=120)
    finally:
        await asyncio.to_thread(producer.close, 5)
        service.close()

    # Every event acknowledged, some only after retries across the outage.
    assert killed_at.accepted < EVENTS
    assert all(r.accepted or r.duplicate for r in results)
    counters = producer.counters
    assert counters.retried > 0
    assert counters.accepted + counters.duplicate == EVENTS
    assert counters.dropped == counters.rejected == 0

    # Stored exactly once each: de-duplication caught every retry of a committed batch.
    cur = await world.conn.execute(
        "SELECT count(*), count(DISTINCT message_id) FROM events")
    assert await cur.fetchone() == (EVENTS, EVENTS)
    sent_ids = [r.message_id for r in results]
    cur = await world.conn.execute("SELECT message_id FROM events")
    assert sorted(r[0] for r in await cur.fetchall()) == sorted(sent_ids)

    # Each user's events reached the sink in send() order (first delivery of each event;
    # the router may deliver an event again after a retry, never one out of turn).
    seen: set[str] = set()
    arrived: dict[str, list[int]] = {}
    for delivery in world.webhook.oks:
        if delivery.message_id not in seen:
            seen.add(delivery.message_id)
            arrived.setdefault(delivery.user_id, []).append(
                delivery.body["properties"]["seq"])
    assert len(seen) == EVENTS
    assert len(arrived) == USERS
    for user, seqs in arrived.items():
        assert seqs == list(range(1, len(seqs) + 1)), user
