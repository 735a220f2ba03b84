"""relayq-ingest as real processes: crashes, shutdown, duplicates across processes, outages."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import grpc
import pytest
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relayq.v1 import ingest_pb2, ingest_pb2_grpc
from tests import factories
from tests.helpers import auth, count, event
from tests.services import ingest, ingest_process
from tests.tcpproxy import TCPProxy

Status = ingest_pb2.EventResult.Status


def stub_for(port: int) -> tuple[grpc.aio.Channel, ingest_pb2_grpc.IngestStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, ingest_pb2_grpc.IngestStub(channel)


@pytest.mark.process
async def test_an_acknowledged_batch_survives_kill_9_right_after_the_ack(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    service = ingest_process(database)
    try:
        channel, stub = stub_for(service.port)
        async with channel:
            response = await stub.Ingest(
                ingest_pb2.IngestRequest(events=[event(f"m{i}", f"u{i % 7}") for i in range(100)]),
                metadata=auth(web.write_key), timeout=10)
        service.kill()  # SIGKILL at once: no shutdown hook runs
    finally:
        service.close()
    assert response.accepted == 100
    acked = [(r.event_id, r.message_id) for r in response.results]
    cur = await conn.execute("SELECT event_id, message_id FROM events ORDER BY event_id")
    assert await cur.fetchall() == acked


async def test_one_message_id_sent_to_two_ingest_processes_at_once_is_stored_once(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    first, second = ingest_process(database), ingest_process(database)
    try:
        channels = [stub_for(first.port), stub_for(second.port)]
        for round_ in range(30):
            batch = ingest_pb2.IngestRequest(events=[event(f"race-{round_}")])
            answers = await asyncio.gather(*(
                stub.Ingest(batch, metadata=auth(web.write_key), timeout=10)
                for _, stub in channels))
            statuses = sorted(a.results[0].status for a in answers)
            assert statuses == [Status.ACCEPTED, Status.DUPLICATE], round_
        for channel, _ in channels:
            await channel.close()
    finally:
        first.close()
        second.close()
    cur = await conn.execute(
        "SELECT message_id, count(*) FROM events GROUP BY message_id HAVING count(*) > 1")
    assert await cur.fetchall() == []
    assert await count(conn, "events") == 30


@pytest.mark.process
async def test_sigterm_drains_requests_in_flight(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    """Requests already received are committed and answered; none is cut off half-done."""
    # A long group-commit delay keeps requests in flight when the signal arrives.
    service = ingest_process(database, RELAYQ_INGEST_FLUSH_DELAY_MS="300")
    try:
        channel, stub = stub_for(service.port)
        async with channel:
            calls = [
                asyncio.ensure_future(stub.Ingest(
                    ingest_pb2.IngestRequest(events=[event(f"m{i}", f"u{i}")]),
                    metadata=auth(web.write_key), timeout=10))
                for i in range(20)
            ]
            await asyncio.sleep(0.1)  # received, waiting for their flush
            service.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*calls)
        assert await asyncio.to_thread(service.process.wait, 20) == 0
    finally:
        service.close()
    assert all(a.accepted == 1 for a in answers)
    cur = await conn.execute("SELECT event_id FROM events ORDER BY event_id")
    assert [r[0] for r in await cur.fetchall()] == sorted(a.results[0].event_id for a in answers)


async def test_postgres_unreachable_is_unavailable_and_ingest_recovers_by_itself(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    params = conninfo_to_dict(database)
    proxy = TCPProxy(str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)))
    await proxy.start()
    through_proxy = make_conninfo(database, host="127.0.0.1", port=proxy.port)
    # The route is cached after the first request, so the outage hits the commit itself.
    async with ingest(through_proxy, RELAYQ_INGEST_ROUTE_CACHE_SECONDS="60") as service:
        ok = await service.stub.Ingest(ingest_pb2.IngestRequest(events=[event("m1")]),
                                       metadata=auth(web.write_key), timeout=10)
        assert ok.accepted == 1

        await proxy.cut()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.Ingest(ingest_pb2.IngestRequest(events=[event("m2")]),
                                      metadata=auth(web.write_key), timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        await proxy.restore()
        # The client's retry of the very same batch now succeeds, once.
        errors: list[grpc.StatusCode] = []
        again = None
        while again is None and len(errors) < 100:
            try:
                again = await service.stub.Ingest(
                    ingest_pb2.IngestRequest(events=[event("m2")]),
                    metadata=auth(web.write_key), timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc.code())
                await asyncio.sleep(0.2)
        assert set(errors) <= {grpc.StatusCode.UNAVAILABLE}
        assert again is not None, "ingest did not recover after Postgres came back"
        assert again.results[0].status == Status.ACCEPTED
    await proxy.cut()
    cur = await conn.execute("SELECT message_id FROM events ORDER BY event_id")
    assert [r[0] for r in await cur.fetchall()] == ["m1", "m2"]
