"""relayq.client against a real relayq-ingest (in-process, real gRPC on loopback) and Postgres.

The sync Producer runs its own loop in a thread, while the ingest server runs on the test's
loop: so the tests never block on a handle or a flush; they await them (wrap_future,
to_thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from psycopg import AsyncConnection

from relayq.client import (
    AsyncProducer,
    BufferFull,
    DeliveryFailed,
    InvalidEvent,
    Producer,
    ProducerClosed,
    SendResult,
    Status,
)
from relayq.ports import free_port
from tests import factories
from tests.certs import needs_openssl, self_signed
from tests.services import Ingest, ingest

MakeProducer = Callable[..., Producer]


@pytest.fixture
async def producers() -> AsyncIterator[MakeProducer]:
    """Producer(**options), closed at the end of the test (off the test's loop)."""
    made: list[Producer] = []

    def make(**options: Any) -> Producer:
        made.append(Producer(**options))
        return made[-1]

    yield make
    for producer in made:
        # Short: a test that left events stuck (nothing listening) has checked what it wanted.
        await asyncio.to_thread(producer.close, 1)


def address(service: Ingest) -> str:
    return f"127.0.0.1:{service.app.port}"


async def answers(handles: Iterable[concurrent.futures.Future[SendResult]]
                  ) -> list[SendResult]:
    return [await asyncio.wrap_future(h) for h in handles]


async def event_ids_by_message(conn: AsyncConnection[Any]) -> dict[str, int]:
    """The event log: each stored event's id by its message id, in event order."""
    cur = await conn.execute("SELECT message_id, event_id FROM events ORDER BY event_id")
    return dict(await cur.fetchall())


async def test_events_go_in_batches_and_each_handle_resolves_to_its_event(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer
) -> None:
    async with ingest(database) as service:
        producer = producers(address=address(service), write_key=web.write_key,
                             batch_events=50, linger_ms=200, in_flight=1)
        handles = [producer.send(user_id=f"u{i % 3}", event="Order Completed", type="track",
                                 properties={"n": i}) for i in range(120)]
        assert await asyncio.to_thread(producer.flush, 30)
        results = await answers(handles)
    stored = await event_ids_by_message(conn)
    assert all(r.status is Status.ACCEPTED and r.accepted for r in results)
    # Each handle's event id is its stored event's; one batch in flight: in send() order.
    assert [(r.message_id, r.event_id) for r in results] == list(stored.items())
    # 120 events sent at once, 50 per batch: 50, 50, then the last 20 after their linger.
    counters = producer.counters
    assert (counters.sent, counters.accepted, counters.batches) == (120, 120, 3)
    # Generated ids are UUIDv7, in send() order.
    ids = [r.message_id for r in results]
    assert ids == sorted(ids)
    assert len(set(ids)) == 120
    assert ids[0][14] == "7"


async def test_linger_holds_a_small_batch_and_a_full_batch_goes_at_once(
    database: str, web: factories.Source, producers: MakeProducer
) -> None:
    async with ingest(database) as service:
        lingering = producers(address=address(service), write_key=web.write_key,
                              linger_ms=400)
        started = time.monotonic()
        handles = [lingering.send(user_id="u1", event="e") for _ in range(5)]
        await answers(handles)
        assert time.monotonic() - started >= 0.4
        assert lingering.counters.batches == 1  # the five waited together

        full = producers(address=address(service), write_key=web.write_key,
                         linger_ms=60_000, batch_events=5)
        started = time.monotonic()
        await answers([full.send(user_id="u1", event="e") for _ in range(5)])
        assert time.monotonic() - started < 30  # not the minute's linger: the batch was full


async def test_a_message_id_sent_again_is_answered_duplicate_and_stored_once(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer
) -> None:
    async with ingest(database) as service:
        producer = producers(address=address(service), write_key=web.write_key)
        first, again = await answers([
            producer.send(user_id="u1", event="e", message_id="order-1001"),
            producer.send(user_id="u1", event="e", message_id="order-1001")])
    assert (first.status, again.status) == (Status.ACCEPTED, Status.DUPLICATE)
    assert again.duplicate
    assert again.event_id == 0
    assert await event_ids_by_message(conn) == {"order-1001": first.event_id}
    assert producer.counters.duplicate == 1


async def test_a_bad_event_is_rejected_while_its_batch_mates_are_accepted(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer
) -> None:
    """Faults only the server can see: a destination not connected, an event over a limit
    the server was configured lower than the client's. One batch, one round trip."""
    async with ingest(database, RELAYQ_INGEST_MAX_EVENT_BYTES="1024") as service:
        producer = producers(address=address(service), write_key=web.write_key,
                             linger_ms=1000)
        handles = [producer.send(user_id="u1", event="e", properties={"i": i})
                   for i in range(4)]
        handles.insert(1, producer.send(user_id="u1", event="e", properties={"x": "y" * 2000}))
        handles.insert(3, producer.send(user_id="u1", event="e", destination_ids=["nope"]))
        results = await answers(handles)
    assert [r.status for r in results] == [
        Status.ACCEPTED, Status.REJECTED, Status.ACCEPTED, Status.REJECTED, Status.ACCEPTED,
        Status.ACCEPTED]
    assert "over the limit of 1024 bytes per event (RELAYQ_INGEST_MAX_EVENT_BYTES)" in (
        results[1].reason)
    assert "'nope' is not a destination connected to source 'web'" in results[3].reason
    assert sorted(await event_ids_by_message(conn)) == sorted(
        r.message_id for r in results if r.accepted)
    counters = producer.counters
    assert (counters.accepted, counters.rejected, counters.batches) == (4, 2, 1)


async def test_a_batch_the_server_refuses_whole_is_split_until_the_good_events_go(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer
) -> None:
    """A server with a lower batch limit than the producer's answers INVALID_ARGUMENT for the
    whole batch; the producer halves it, in order, until each part is taken."""
    async with ingest(database, RELAYQ_INGEST_MAX_BATCH_EVENTS="8") as service:
        producer = producers(address=address(service), write_key=web.write_key,
                             batch_events=20, linger_ms=1000)
        results = await answers([producer.send(user_id="u1", event="e", properties={"i": i})
                                 for i in range(20)])
    assert all(r.accepted for r in results)
    stored = await event_ids_by_message(conn)
    event_ids = [stored[r.message_id] for r in results]
    assert event_ids == [r.event_id for r in results]
    assert event_ids == sorted(event_ids)  # the halves went in send() order


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"event": "e"}, "user_id: one of user_id or anonymous_id is required"),
        ({"user_id": "u", "message_id": ""}, "message_id: required"),
        ({"user_id": "u", "message_id": "m" * 129}, "message_id: longer than 128 characters"),
        ({"user_id": "u\n"}, "user_id: contains control characters"),
        ({"anonymous_id": "a" * 257}, "anonymous_id: longer than 256 characters"),
        ({"user_id": "u", "event": "e" * 257}, "event: longer than 256 characters"),
        ({"user_id": "u", "properties": ["not", "an", "object"]},
         "properties: expected a JSON object (a dict), got list"),
        ({"user_id": "u", "properties": {"when": object()}}, "properties: not JSON"),
        ({"user_id": "u", "properties": {"blob": "x" * 70_000}},
         "over the limit of 65536 (ingest's RELAYQ_INGEST_MAX_EVENT_BYTES"),
        ({"user_id": "u", "timestamp": datetime(2026, 1, 1)}, "timestamp: needs a time zone"),
        ({"user_id": "u", "timestamp": "yesterday"}, "timestamp: expected ISO 8601"),
        ({"user_id": "u", "destination_ids": "d1"}, "destination_ids: expected a list"),
    ],
)
def test_send_refuses_what_ingest_would_refuse_and_queues_nothing(
    producers: MakeProducer, fields: dict[str, Any], message: str
) -> None:
    producer = producers(address=f"127.0.0.1:{free_port()}", write_key="rq_wk_nothing")
    with pytest.raises(InvalidEvent) as caught:
        producer.send(**fields)
    assert message in str(caught.value)
    assert producer.counters.sent == 0


async def test_a_timestamp_and_context_reach_the_stored_event(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    async with ingest(database) as service, AsyncProducer(
            address=address(service), write_key=web.write_key) as producer:
        handle = await producer.send(
            anonymous_id="anon-7", event="Page Viewed", type="page",
            properties={"path": "/"}, context={"library": {"name": "relayq"}},
            timestamp=datetime(2026, 3, 1, 12, 30, tzinfo=UTC))
        assert (await handle).accepted
    cur = await conn.execute("SELECT user_id, document::jsonb FROM events")
    user_id, payload = await cur.fetchone() or (None, None)
    assert user_id == "anon-7"
    assert payload["timestamp"] == "2026-03-01T12:30:00Z"
    assert payload["context"] == {"library": {"name": "relayq"}}
    assert (payload["type"], payload["event"], payload["properties"]) == (
        "page", "Page Viewed", {"path": "/"})


async def test_the_async_producer_keeps_each_users_events_in_send_order(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    async with ingest(database) as service, AsyncProducer(
            address=address(service), write_key=web.write_key, in_flight=4,
            batch_events=25, linger_ms=1) as producer:
        handles = [await producer.send(user_id=f"u{i % 13}", event="e", properties={"seq": i})
                   for i in range(1000)]
        results = await asyncio.gather(*handles)
        assert await producer.flush(10)
    assert all(r.accepted for r in results)
    cur = await conn.execute("SELECT user_id, (document::jsonb->'properties'->>'seq')::int"
                             " FROM events ORDER BY event_id")
    by_user: dict[str, list[int]] = {}
    for user, seq in await cur.fetchall():
        by_user.setdefault(user, []).append(seq)
    assert len(by_user) == 13
    assert all(seqs == sorted(seqs) for seqs in by_user.values())
    assert producer.counters.batches > 4 * 2  # several lanes, several batches each


async def test_resource_exhausted_waits_at_least_what_retry_info_says(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer
) -> None:
    """A source limited to 100 events/s (burst 50) and a producer whose own backoff is a
    millisecond: only RetryInfo can make it wait ~0.5 s between batches of 50."""
    await conn.execute("UPDATE sources SET rate_per_second = 100, rate_burst = 50"
                       " WHERE source_key = %s", (web.key,))
    async with ingest(database) as service:
        producer = producers(address=address(service), write_key=web.write_key,
                             batch_events=50, in_flight=1, linger_ms=0,
                             backoff_min=0.001, backoff_max=0.002)
        started = time.monotonic()
        results = await answers([producer.send(user_id="u1", event="e") for _ in range(250)])
        elapsed = time.monotonic() - started
    assert all(r.accepted for r in results)
    # 50 at once, then 200 more at 100/s.
    assert elapsed >= 1.8
    # Each refusal said when to come back; a client ignoring it would have retried
    # hundreds of times at its 1-2 ms backoff.
    retried_batches = producer.counters.retried / 50
    assert 1 <= retried_batches <= 8


async def test_a_full_buffer_raises_at_once_or_after_block_timeout(
    producers: MakeProducer
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    raising = producers(address=nowhere, write_key="rq_wk_x", batch_events=5,
                        buffer_events=5, when_full="raise", backoff_max=0.2)
    for _ in range(5):
        raising.send(user_id="u1", event="e")
    started = time.monotonic()
    with pytest.raises(BufferFull, match="buffer is full"):
        raising.send(user_id="u1", event="e")
    assert time.monotonic() - started < 0.5

    blocking = producers(address=nowhere, write_key="rq_wk_x", batch_events=5,
                         buffer_events=5, block_timeout=0.5, backoff_max=0.2)
    for _ in range(5):
        blocking.send(user_id="u1", event="e")
    started = time.monotonic()
    with pytest.raises(BufferFull):
        await asyncio.to_thread(blocking.send, user_id="u1", event="e")
    assert time.monotonic() - started >= 0.5
    assert blocking.counters.sent == 5


async def test_the_async_producer_applies_the_same_buffer_policies() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    async with AsyncProducer(address=nowhere, write_key="rq_wk_x", batch_events=5,
                             buffer_events=5, when_full="raise", backoff_max=0.2) as raising:
        for _ in range(5):
            await raising.send(user_id="u1", event="e")
        with pytest.raises(BufferFull):
            await raising.send(user_id="u1", event="e")
        await raising.close(timeout=0.1)
    async with AsyncProducer(address=nowhere, write_key="rq_wk_x", batch_events=5,
                             buffer_events=5, block_timeout=0.3, backoff_max=0.2) as blocking:
        handles = [await blocking.send(user_id="u1", event="e") for _ in range(5)]
        started = time.monotonic()
        with pytest.raises(BufferFull):
            await blocking.send(user_id="u1", event="e")
        assert time.monotonic() - started >= 0.3
        await blocking.close(timeout=0.1)
    for handle in handles:  # closed before any answer: each says so
        with pytest.raises(ProducerClosed):
            await handle


async def test_a_blocked_send_goes_on_once_ingest_takes_the_buffer(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer
) -> None:
    """Ingest is not there yet: the buffer fills with retried batches and a sixth send
    blocks; when ingest comes up the buffer drains, the send returns, and all six land."""
    port = free_port()
    producer = producers(address=f"127.0.0.1:{port}", write_key=web.write_key,
                         batch_events=5, buffer_events=5, block_timeout=60,
                         backoff_min=0.05, backoff_max=0.2)
    handles = [producer.send(user_id="u1", event="e", properties={"i": i}) for i in range(5)]
    blocked = asyncio.ensure_future(asyncio.to_thread(
        producer.send, user_id="u1", event="e", properties={"i": 5}))
    await asyncio.sleep(0.3)
    assert not blocked.done()
    async with ingest(database, RELAYQ_INGEST_ADDRESS=f"127.0.0.1:{port}"):
        handles.append(await asyncio.wait_for(blocked, 30))
        results = await answers(handles)
    assert all(r.accepted for r in results)
    assert producer.counters.retried >= 5
    cur = await conn.execute("SELECT (document::jsonb->'properties'->>'i')::int FROM events"
                             " ORDER BY event_id")
    assert [r[0] for r in await cur.fetchall()] == list(range(6))


async def test_close_sends_what_is_buffered_without_waiting_for_the_linger(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    async with ingest(database) as service:
        producer = Producer(address=address(service), write_key=web.write_key,
                            linger_ms=60_000)
        handles = [producer.send(user_id=f"u{i}", event="e") for i in range(30)]
        started = time.monotonic()
        await asyncio.to_thread(producer.close)
        assert time.monotonic() - started < 10
        assert all(h.done() and h.result().accepted for h in handles)
    with pytest.raises(ProducerClosed):
        producer.send(user_id="u1", event="e")
    cur = await conn.execute("SELECT count(*) FROM events")
    assert (await cur.fetchone() or [0])[0] == 30


async def test_close_at_interpreter_exit_delivers_what_a_script_sent(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    """A script that never calls close(): the atexit hook flushes its events."""
    script = ("import sys\nfrom relayq.client import Producer\n"
              "p = Producer(address=sys.argv[1], write_key=sys.argv[2], linger_ms=60_000)\n"
              "for i in range(25):\n    p.send(user_id='u1', event='from a script')\n")
    async with ingest(database) as service:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, address(service), web.write_key,
            stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, stderr.decode()
    cur = await conn.execute("SELECT count(*) FROM events")
    assert (await cur.fetchone() or [0])[0] == 25


@pytest.mark.parametrize(("change", "code"), [
    ("key", grpc.StatusCode.UNAUTHENTICATED),
    ("disable", grpc.StatusCode.PERMISSION_DENIED),
])
async def test_permanent_errors_fail_the_events_at_once_without_retrying(
    database: str, conn: AsyncConnection[Any], web: factories.Source, producers: MakeProducer,
    change: str, code: grpc.StatusCode
) -> None:
    key = web.write_key
    if change == "key":
        key = "rq_wk_wrong"
    else:
        await conn.execute("UPDATE sources SET enabled = false WHERE source_key = %s",
                           (web.key,))
    async with ingest(database) as service:
        producer = producers(address=address(service), write_key=key, linger_ms=0)
        handles = [producer.send(user_id="u1", event="e") for _ in range(3)]
        started = time.monotonic()
        for handle in handles:
            with pytest.raises(DeliveryFailed) as caught:
                await asyncio.wrap_future(handle)
            assert caught.value.code == code
        assert time.monotonic() - started < 5
    counters = producer.counters
    assert (counters.dropped, counters.retried) == (3, 0)


async def test_events_unacknowledged_within_the_delivery_timeout_fail(
    producers: MakeProducer
) -> None:
    producer = producers(address=f"127.0.0.1:{free_port()}", write_key="rq_wk_x",
                         delivery_timeout=0.6, backoff_min=0.05, backoff_max=0.1)
    started = time.monotonic()
    with pytest.raises(DeliveryFailed) as caught:
        await asyncio.wrap_future(producer.send(user_id="u1", event="e"))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts >= 2
    assert 0.5 <= time.monotonic() - started < 5
    assert producer.counters.dropped == 1


@needs_openssl
async def test_tls_with_a_ca_file(
    database: str, web: factories.Source, tmp_path: Path, producers: MakeProducer
) -> None:
    cert, key = self_signed(tmp_path)
    async with ingest(database, RELAYQ_TLS_CERT_FILE=str(cert),
                      RELAYQ_TLS_KEY_FILE=str(key)) as service:
        producer = producers(address=f"localhost:{service.app.port}",
                             write_key=web.write_key, ca_file=cert)
        (result,) = await answers([producer.send(user_id="u1", event="e")])
        assert result.accepted
        plaintext = producers(address=f"localhost:{service.app.port}",
                              write_key=web.write_key, delivery_timeout=1)
        with pytest.raises(DeliveryFailed):
            await asyncio.wrap_future(plaintext.send(user_id="u1", event="e"))
