"""Signed webhooks end to end: a destination made through admin, events through ingest and a
router, requests verified by a real HTTP receiver with the independent reference verifier
(`standardwebhooks`), before, during and after a rotation's grace period."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from relayq.v1 import admin_pb2, common_pb2
from tests.helpers import event, verifies
from tests.pipeline import World, router_connects, send, wait_until_finished
from tests.poll import eventually
from tests.services import Admin, Ingest, admin, ingest, router
from tests.sinks import OK, Answer, Received

AUTH = Admin.auth()
_numbers = itertools.count()


def signatures(delivery: Received) -> list[str]:
    return delivery.headers["webhook-signature"].split(" ")


async def deliver_one(world: World, service: Ingest) -> Received:
    """An event through the pipeline; the request that delivered it."""
    message_id = f"probe-{next(_numbers)}"
    await send(service, world.source, [event(message_id, "alice")])
    await world.webhook.wait_for(lambda: any(r.message_id == message_id
                                             for r in world.webhook.oks))
    return next(r for r in world.webhook.oks if r.message_id == message_id)


async def until_delivered(world: World, service: Ingest, done: Callable[[Received], bool],
                          within: float = 30.0) -> Received:
    """Deliveries, one after another, until one is `done` (a router applies a rotation within
    moments of it, not at the same instant), or the deadline passes."""
    async def one_done() -> Received | None:
        delivery = await deliver_one(world, service)
        return delivery if done(delivery) else None

    found = await eventually(one_done, within=within, every=0.05, what="such a delivery")
    assert found is not None
    return found


async def until_signed_by(world: World, service: Ingest, count: int) -> Received:
    return await until_delivered(world, service, lambda d: len(signatures(d)) == count)


async def test_signatures_verify_before_during_and_after_a_rotation(
        world: World, conn: AsyncConnection[Any]) -> None:
    async with admin(world.database) as adm, ingest(world.database) as service, \
            router(world.database) as running:
        created = await adm.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="signed", tenant_id="acme", type="webhook", endpoint=world.webhook.url,
            retry_policy=common_pb2.RetryPolicy(min_backoff_ms=20, max_backoff_ms=100)),
            metadata=AUTH)
        first = created.signing_secret
        assert first.startswith("whsec_")
        await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
            source_id="web", destination_id="signed"), metadata=AUTH)
        await router_connects(running, world.source.key, "signed")

        # Before: one signature, by the first secret, on every attempt; the same webhook-id
        # on a retry, so a receiver can drop repeats.
        world.webhook.answer = lambda d: Answer(503) if d.attempt == 1 else OK
        [job_id] = await send(service, world.source, [event("before", "alice")])
        await world.webhook.wait_for(lambda: any(r.message_id == "before"
                                                 for r in world.webhook.oks))
        world.webhook.answer = lambda _: OK
        attempts = [r for r in world.webhook.received if r.message_id == "before"]
        assert [r.attempt for r in attempts] == [1, 2]
        assert {r.headers["webhook-id"] for r in attempts} == {f"msg_{job_id}"}
        for delivery in attempts:
            assert len(signatures(delivery)) == 1
            assert verifies(first, delivery)
            assert delivery.headers["Content-Type"] == "application/json"

        # During the grace period: signed by both, each verifies alone.
        rotated = await adm.stub.RotateSigningSecret(admin_pb2.RotateSigningSecretRequest(
            destination_id="signed", grace_seconds=3600), metadata=AUTH)
        second = rotated.signing_secret
        assert second.startswith("whsec_")
        assert second != first
        assert rotated.HasField("previous_expire_at")
        during = await until_signed_by(world, service, 2)
        assert verifies(first, during)
        assert verifies(second, during)

        # The grace period ends (brought forward in the database rather than waited for;
        # the router drops the old secret when its time comes, by its own clock).
        await conn.execute("UPDATE destination_secrets SET expires_at = now() + interval '1s'"
                           " WHERE expires_at IS NOT NULL")
        after = await until_signed_by(world, service, 1)
        assert verifies(second, after)
        assert not verifies(first, after)

        # Never shown again: not by Get, not by List.
        got = await adm.stub.GetDestination(admin_pb2.GetDestinationRequest(id="signed"),
                                            metadata=AUTH)
        listed = await adm.stub.ListDestinations(admin_pb2.ListDestinationsRequest(),
                                                 metadata=AUTH)
        for answer in (got, listed):
            shown = text_format.MessageToString(answer)
            assert "signed" in shown
            assert first.removeprefix("whsec_") not in shown
            assert second.removeprefix("whsec_") not in shown
        assert got.signing_secret == ""


async def test_a_zero_grace_rotation_stops_the_old_secret_at_once(world: World) -> None:
    async with admin(world.database) as adm, ingest(world.database) as service, \
            router(world.database) as running:
        created = await adm.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="signed", tenant_id="acme", type="webhook", endpoint=world.webhook.url),
            metadata=AUTH)
        await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
            source_id="web", destination_id="signed"), metadata=AUTH)
        await router_connects(running, world.source.key, "signed")
        assert verifies(created.signing_secret, await deliver_one(world, service))
        rotated = await adm.stub.RotateSigningSecret(admin_pb2.RotateSigningSecretRequest(
            destination_id="signed", grace_seconds=0), metadata=AUTH)
        delivery = await until_delivered(
            world, service, lambda d: verifies(rotated.signing_secret, d))
        assert len(signatures(delivery)) == 1
        assert not verifies(created.signing_secret, delivery)


async def test_rotating_a_grpc_destination_or_nothing_is_refused_and_changes_nothing(
        world: World, conn: AsyncConnection[Any]) -> None:
    async with admin(world.database) as adm:
        made = await adm.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="sink", tenant_id="acme", type="grpc", endpoint="127.0.0.1:9"), metadata=AUTH)
        assert made.signing_secret == ""  # only webhooks sign
        await adm.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="hook", tenant_id="acme", type="webhook", endpoint="http://127.0.0.1:9/"),
            metadata=AUTH)

        async def secrets() -> list[tuple[Any, ...]]:
            cur = await conn.execute("SELECT destination_key, secret, expires_at"
                                     " FROM destination_secrets ORDER BY secret_id")
            return await cur.fetchall()

        before = await secrets()
        assert len(before) == 1
        refusals = [
            (admin_pb2.RotateSigningSecretRequest(destination_id="sink"),
             grpc.StatusCode.FAILED_PRECONDITION,
             "destination 'sink' is a grpc destination; only webhook destinations sign"),
            (admin_pb2.RotateSigningSecretRequest(destination_id="nope"),
             grpc.StatusCode.NOT_FOUND, "destination 'nope' not found"),
            (admin_pb2.RotateSigningSecretRequest(destination_id="hook",
                                                  grace_seconds=31 * 86_400),
             grpc.StatusCode.INVALID_ARGUMENT, "grace_seconds: at most 30 days"),
            (admin_pb2.RotateSigningSecretRequest(), grpc.StatusCode.INVALID_ARGUMENT,
             "destination_id: required"),
        ]
        for request, code, message in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await adm.stub.RotateSigningSecret(request, metadata=AUTH)
            assert refused.value.code() is code
            assert message in (refused.value.details() or ""), refused.value.details()
            assert await secrets() == before


async def test_a_destination_without_a_secret_sends_no_signature_and_forges_none(
        world: World) -> None:
    """Made before signing existed (or by hand): no secret, so no webhook-signature; and
    headers of its own that relayq sets are left out rather than sent twice or forged."""
    await world.destination("old", headers=Jsonb({
        "X-Api-Key": "k1", "webhook-signature": "v1,forged", "Content-Type": "text/plain",
        "User-Agent": "ua"}))
    async with ingest(world.database) as service, router(world.database):
        [job_id] = await send(service, world.source, [event("m1", "alice")])
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1)
    [delivery] = world.webhook.oks
    assert "webhook-signature" not in {name.lower() for name in delivery.headers}
    assert delivery.headers["webhook-id"] == f"msg_{job_id}"
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 60
    assert delivery.headers["Content-Type"] == "application/json"
    assert (delivery.headers["X-Api-Key"], delivery.headers["User-Agent"]) == ("k1", "ua")


async def test_a_batch_is_signed_as_one_body_and_its_history_names_it(world: World) -> None:
    """A JSON array of events is one request: one webhook-id and signature over the array
    exactly as sent, verified by the reference verifier; each job's attempt records it."""
    async with admin(world.database) as adm, ingest(world.database) as service, \
            router(world.database) as running:
        created = await adm.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="bulk", tenant_id="acme", type="webhook", endpoint=world.webhook.url,
            batch_policy=admin_pb2.BatchPolicy(max_events=50, linger_ms=1000)),
            metadata=AUTH)
        await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
            source_id="web", destination_id="bulk"), metadata=AUTH)
        await router_connects(running, world.source.key, "bulk")
        ids = await send(service, world.source,
                         [event(f"m{i}", f"user-{i % 3}") for i in range(12)])
        await wait_until_finished(world.conn, 12)
        job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=ids[5]), metadata=AUTH)
    (request,) = {d.headers["webhook-id"]: d for d in world.webhook.received}.values()
    assert verifies(created.signing_secret, request)
    assert request.raw.startswith(b"[")  # the array as sent is what is signed
    assert [d.job_id for d in world.webhook.oks] == ids  # job order, users interleaved
    assert request.headers["webhook-id"].startswith(f"msg_b{ids[0]}_")
    assert [h.batch_id for h in job.history] == [request.headers["webhook-id"]]
