"""Replays and backfills with real services and sinks: ReplayEvents, ListReplays, GetReplay,
CancelReplay, and ConnectSource's backfill_from (issue 18)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from relayq.v1 import admin_pb2
from tests import factories
from tests.helpers import event
from tests.pipeline import World, send
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router
from tests.sinks import OK, Answer, Received

AUTH = Admin.auth()


def stamp(when: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(when)
    return value


def by_user(received: list[Received], message_ids: set[str] | None = None
            ) -> dict[str, list[str]]:
    users: dict[str, list[str]] = defaultdict(list)
    for r in received:
        if message_ids is None or r.message_id in message_ids:
            users[r.user_id].append(r.message_id)
    return users


def in_order(seen: list[str], order: list[str]) -> bool:
    """Is `seen` (possibly with repeats of a delivery whose record was lost) in `order`'s
    order? Each message's first arrival is what order is about."""
    firsts: list[str] = []
    for m in seen:
        if m not in firsts:
            firsts.append(m)
    positions = [order.index(m) for m in firsts]
    return positions == sorted(positions)


async def replay_done(adm: Admin, replay_id: str) -> admin_pb2.Replay:
    found: admin_pb2.Replay | None = None

    async def finished() -> bool:
        nonlocal found
        found = await adm.stub.GetReplay(admin_pb2.GetReplayRequest(replay_id=replay_id),
                                         metadata=AUTH)
        return found.state == "done" and found.pending == 0

    await eventually(finished, within=60, what=lambda: f"replay finished: {found}")
    assert found is not None
    return found


async def test_replay_sends_a_range_again_in_order_after_a_dry_run(world: World) -> None:
    await world.destination("d1")
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        events = [event(f"m{i}", f"u{i % 3}", n=i) for i in range(30)]
        await send(service, world.source, events)
        await world.webhook.wait_for(lambda: len(world.webhook.received) >= 30)
        first = len(world.webhook.received)
        request = admin_pb2.ReplayEventsRequest(
            source_id="web", destination_id="d1", filter="properties.n >= 10", dry_run=True)
        dry = await adm.stub.ReplayEvents(request, metadata=AUTH)
        assert (dry.matched, dry.dry_run, dry.HasField("replay")) == (20, True, False)
        await eventually(lambda: True)
        assert len(world.webhook.received) == first  # a dry run sends nothing

        request.dry_run = False
        request.reason = "the receiver lost yesterday's data"
        started = await adm.stub.ReplayEvents(request, metadata=AUTH)
        assert started.matched == 20
        replay = started.replay
        assert replay.replay_id.startswith("rpl-")
        assert replay.kind == "replay"
        assert (replay.actor, replay.reason) == ("admin:operator", request.reason)
        done = await replay_done(adm, replay.replay_id)
        assert (done.written, done.delivered, done.aborted) == (20, 20, 0)

        again = world.webhook.received[first:]
        assert sorted(r.message_id for r in again) == sorted(f"m{i}" for i in range(10, 30))
        order = [f"m{i}" for i in range(30)]
        for seen in by_user(again).values():
            assert in_order(seen, order)
        listed = await adm.stub.ListReplays(admin_pb2.ListReplaysRequest(destination_id="d1"),
                                            metadata=AUTH)
        assert [r.replay_id for r in listed.replays] == [replay.replay_id]
        # A replayed job's history says who replayed it and why.
        job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=again[0].job_id),
                                    metadata=AUTH)
        assert any(s.actor == "admin:operator" and request.reason in s.reason for s in job.history)


async def test_a_replayed_event_waits_behind_its_users_earlier_failed_job(world: World) -> None:
    """Replayed events go after an earlier event of the same user that is not delivered yet
    (a failed job waiting for its retry)."""
    stuck: set[str] = {"m5"}

    def answer(delivery: Received) -> Answer:
        return Answer(503) if delivery.message_id in stuck else OK

    world.webhook.answer = answer
    await world.destination("d1", min_backoff_ms=300, max_backoff_ms=300)
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        await send(service, world.source, [event(f"m{i}", "u1", n=i) for i in range(10)])
        await world.webhook.wait_for(
            lambda: {r.message_id for r in world.webhook.received} >= {"m0", "m1", "m2", "m5"})
        mark = len(world.webhook.received)
        started = await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
            source_id="web", destination_id="d1",
            filter="properties.n IN (1, 6)", reason="resend"), metadata=AUTH)
        assert started.matched == 2

        async def written() -> admin_pb2.Replay | None:
            found = await adm.stub.GetReplay(admin_pb2.GetReplayRequest(
                replay_id=started.replay.replay_id), metadata=AUTH)
            return found if found.state == "done" else None

        # Every row written while m5 still fails: m6 was not delivered yet (it waits behind
        # m5), so it is left as it is and sent once, after m5, not twice.
        assert (await eventually(written, within=30)).written == 1
        stuck.clear()
        await replay_done(adm, started.replay.replay_id)
        await world.webhook.wait_for(
            lambda: "m9" in [r.message_id for r in world.webhook.received[mark:]])
        after = [r.message_id for r in world.webhook.received[mark:]]
        assert after.count("m6") == 1
        # m1's replay may go at once (nothing before it is undelivered); m6 only after m5.
        assert after.index("m5") < len(after) - 1 - after[::-1].index("m6")
        okd = [r.message_id for r in world.webhook.received]
        assert okd.index("m5") < len(okd) - 1 - okd[::-1].index("m6")


async def test_replay_bad_input_is_refused_precisely_and_changes_nothing(world: World) -> None:
    await world.destination("d1")
    other = await factories.tenant(world.conn, "other")
    await factories.destination(world.conn, other, "theirs")
    await factories.destination(world.conn, world.tenant, "unconnected")
    token = await factories.admin_token(world.conn, "other")
    now = datetime.now(UTC)
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"destination_id": "d1"}, grpc.StatusCode.INVALID_ARGUMENT, "source_id: required"),
        ({"source_id": "web", "destination_id": "d1", "reason": ""},
         grpc.StatusCode.INVALID_ARGUMENT, "reason: required"),
        ({"source_id": "web", "destination_id": "d1", "reason": "x", "filter": "properties.n >"},
         grpc.StatusCode.INVALID_ARGUMENT, "filter:"),
        ({"source_id": "web", "destination_id": "d1", "reason": "x",
          "from_time": stamp(now), "to_time": stamp(now - timedelta(hours=1))},
         grpc.StatusCode.INVALID_ARGUMENT, "to_time: must be after from_time"),
        ({"source_id": "web", "destination_id": "d1", "reason": "x", "from_event_id": 9,
          "to_event_id": 3}, grpc.StatusCode.INVALID_ARGUMENT, "to_event_id"),
        ({"source_id": "web", "destination_id": "nope", "reason": "x"},
         grpc.StatusCode.NOT_FOUND, "nope"),
        ({"source_id": "web", "destination_id": "theirs", "reason": "x"},
         grpc.StatusCode.FAILED_PRECONDITION, "not connected"),
        ({"source_id": "web", "destination_id": "unconnected", "reason": "x"},
         grpc.StatusCode.FAILED_PRECONDITION, "not connected"),
    ]
    async with ingest(world.database) as service, admin(world.database) as adm:
        await send(service, world.source, [event(f"m{i}", "u1") for i in range(3)])
        for fields, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(**fields),
                                            metadata=AUTH)
            assert caught.value.code() == code, fields
            assert text in (caught.value.details() or ""), (fields, caught.value.details())
        # Before the oldest retained event: refused with its time, unless asked to start there.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
                source_id="web", destination_id="d1", reason="x",
                from_time=stamp(now - timedelta(days=30))), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "oldest event retained is from" in (caught.value.details() or "")
        allowed = await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
            source_id="web", destination_id="d1", dry_run=True, from_oldest=True,
            from_time=stamp(now - timedelta(days=30))), metadata=AUTH)
        assert allowed.matched == 3
        # Another tenant's token sees neither the source nor the replays.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
                source_id="web", destination_id="d1", reason="x"),
                metadata=Admin.auth(token))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        for bad_id, code in (("rpl-nothex", grpc.StatusCode.INVALID_ARGUMENT),
                             ("rpl-0123456789ab", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await adm.stub.GetReplay(admin_pb2.GetReplayRequest(replay_id=bad_id),
                                         metadata=AUTH)
            assert caught.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await adm.stub.ListReplays(admin_pb2.ListReplaysRequest(state="lost"), metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    cur = await world.conn.execute("SELECT count(*) FROM replays")
    assert (await cur.fetchone()) == (0,)


async def test_cancel_stops_a_replay_and_gives_up_on_its_rows(world: World) -> None:
    await world.destination("d1", paused=True)
    async with ingest(world.database) as service, admin(world.database) as adm:
        await send(service, world.source, [event(f"m{i}", f"u{i % 4}") for i in range(20)])
        # No router: the replay waits for the destination to pass the events.
        started = await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
            source_id="web", destination_id="d1", reason="resend"), metadata=AUTH)
        assert started.matched == 20
        assert started.replay.state == "running"
        cancelled = await adm.stub.CancelReplay(admin_pb2.CancelReplayRequest(
            replay_id=started.replay.replay_id), metadata=AUTH)
        assert (cancelled.state, cancelled.cancelled_by) == ("cancelled", "admin:operator")
        listed = await adm.stub.ListReplays(admin_pb2.ListReplaysRequest(state="cancelled"),
                                            metadata=AUTH)
        assert [r.replay_id for r in listed.replays] == [started.replay.replay_id]


async def test_backfill_gives_a_new_destination_the_past_then_the_live_in_order(
        world: World) -> None:
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        past = [event(f"p{i}", f"u{i % 5}", n=i) for i in range(40)]
        await send(service, world.source, past)
        await factories.destination(world.conn, world.tenant, "late",
                                    endpoint=world.webhook.url, kind="webhook")
        connected = await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
            source_id="web", destination_id="late", filter="properties.n >= 0",
            backfill_from="earliest"), metadata=AUTH)
        assert connected.backfill_id.startswith("bkf-")
        live = [event(f"l{i}", f"u{i % 5}", n=100 + i) for i in range(40)]
        await send(service, world.source, live)
        done = await replay_done(adm, connected.backfill_id)
        assert done.kind == "backfill"
        assert done.written == 40
        names = {e.message_id for e in past + live}
        await world.webhook.wait_for(
            lambda: {r.message_id for r in world.webhook.received} >= names)
        order = [e.message_id for e in past + live]
        for user, seen in by_user(world.webhook.received, names).items():
            assert in_order(seen, order), (user, seen)
        # Refused: a backfill of a connection that exists, or of a shared destination.
        for destination_id, text in (("late", "already connected"),):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
                    source_id="web", destination_id=destination_id,
                    backfill_from="1d"), metadata=AUTH)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert text in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
                source_id="web", destination_id="late", backfill_from="last tuesday"),
                metadata=AUTH)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
