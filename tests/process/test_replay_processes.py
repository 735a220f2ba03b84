"""Replays and backfills with routers as real processes: kill -9 of the router mid-replay and
mid-backfill, with live traffic flowing: nothing lost, each user's order held."""

from __future__ import annotations

from collections import defaultdict

import pytest

from relayq.v1 import admin_pb2
from tests import factories
from tests.helpers import event
from tests.pipeline import World, send
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router_process
from tests.sinks import Answer, Received

pytestmark = pytest.mark.process

AUTH = Admin.auth()


def firsts_in_order(received: list[Received], order: list[str]) -> None:
    """Each user's first arrivals of these messages are in log order (repeats of a delivery
    whose record died with the router are allowed)."""
    rank = {m: i for i, m in enumerate(order)}
    seen: dict[str, list[int]] = defaultdict(list)
    first: set[str] = set()
    for r in received:
        if r.message_id in rank and r.message_id not in first:
            first.add(r.message_id)
            seen[r.user_id].append(rank[r.message_id])
    for user, ranks in seen.items():
        assert ranks == sorted(ranks), (user, ranks)


async def finished(adm: Admin, replay_id: str) -> None:
    async def done() -> bool:
        found = await adm.stub.GetReplay(admin_pb2.GetReplayRequest(replay_id=replay_id),
                                         metadata=AUTH)
        return found.state == "done" and found.pending == 0

    await eventually(done, within=90, what=f"{replay_id} delivered")


async def test_kill_9_mid_replay_loses_nothing_and_keeps_order(world: World) -> None:
    await world.destination("hook", concurrency=8)
    world.webhook.answer = lambda _: Answer(delay=0.005)
    past = [event(f"m{i}", f"user-{i % 10}", n=i) for i in range(600)]
    first = router_process(world.database)
    try:
        async with ingest(world.database) as service, admin(world.database) as adm:
            await send(service, world.source, past)
            await world.webhook.wait_for(lambda: len(world.webhook.oks) >= 600, within=60)
            mark = len(world.webhook.received)
            started = await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
                source_id="web", destination_id="hook", filter="properties.n >= 100",
                reason="kill -9 test"), metadata=AUTH)
            assert started.matched == 500
            await world.webhook.wait_for(lambda: len(world.webhook.received) >= mark + 100)
            first.kill()  # mid-replay: rows written, some delivered, some in flight
            first.close()
            live = [event(f"l{i}", f"user-{i % 10}") for i in range(100)]
            await send(service, world.source, live)
            second = router_process(world.database)
            try:
                await finished(adm, started.replay.replay_id)
                names = {e.message_id for e in live}
                await world.webhook.wait_for(
                    lambda: names <= {r.message_id for r in world.webhook.oks}, within=60)
            finally:
                second.close()
    finally:
        first.close()
    again = world.webhook.received[mark:]
    assert {r.message_id for r in again} >= {f"m{i}" for i in range(100, 600)}
    firsts_in_order(again, [e.message_id for e in past])


async def test_kill_9_mid_backfill_with_live_traffic_loses_nothing_and_keeps_order(
        world: World) -> None:
    world.webhook.answer = lambda _: Answer(delay=0.005)
    past = [event(f"p{i}", f"user-{i % 10}", n=i) for i in range(600)]
    first = router_process(world.database)
    try:
        async with ingest(world.database) as service, admin(world.database) as adm:
            await send(service, world.source, past)
            await factories.destination(world.conn, world.tenant, "late",
                                        endpoint=world.webhook.url, kind="webhook",
                                        concurrency=8)
            connected = await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
                source_id="web", destination_id="late", backfill_from="earliest"),
                metadata=AUTH)
            live = [event(f"l{i}", f"user-{i % 10}") for i in range(200)]
            await send(service, world.source, live[:100])
            await world.webhook.wait_for(lambda: len(world.webhook.received) >= 100)
            first.kill()  # mid-backfill, live events waiting behind it
            first.close()
            await send(service, world.source, live[100:])
            second = router_process(world.database)
            try:
                await finished(adm, connected.backfill_id)
                names = {e.message_id for e in past + live}
                await world.webhook.wait_for(
                    lambda: names <= {r.message_id for r in world.webhook.oks}, within=60)
            finally:
                second.close()
    finally:
        first.close()
    firsts_in_order(world.webhook.received, [e.message_id for e in past + live])
