"""Routers as real processes: kill -9 mid-delivery, and several routers sharing the key space."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.helpers import event, first_deliveries_in_order, owners
from tests.pipeline import World, recorded_attempts, send, states, wait_until_finished
from tests.poll import eventually
from tests.services import ingest, router_process
from tests.sinks import Answer

pytestmark = pytest.mark.process


async def test_kill_9_mid_delivery_then_restart_delivers_everything_in_order(
    world: World,
) -> None:
    await world.destination("hook", concurrency=16)
    world.webhook.answer = lambda _: Answer(delay=0.02)
    events = [event(f"m{i}", f"user-{i % 20}") for i in range(400)]
    async with ingest(world.database) as service:
        ids = await send(service, world.source, events)
    first = router_process(world.database)
    try:
        await world.webhook.wait_for(lambda: len(world.webhook.oks) >= 100)
        first.kill()  # mid-delivery: 16 requests are in flight
        delivered_before = len(world.webhook.oks)
    finally:
        first.close()
    assert delivered_before < len(ids)
    second = router_process(world.database)
    try:
        await wait_until_finished(world.conn, len(ids))
    finally:
        second.close()
    ids_by_user: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(events, ids, strict=True):
        ids_by_user[e.user_id].append(job_id)
    first_deliveries_in_order(ids_by_user, world.webhook.oks)
    assert set((await states(world.conn)).values()) == {"succeeded"}
    # Duplicates are limited to what was in flight or unrecorded when the router died.
    duplicates = len(world.webhook.oks) - len(ids)
    assert 0 <= duplicates <= 16 + 100


async def test_two_routers_share_the_keys_and_one_takes_over_when_the_other_dies(
    world: World,
) -> None:
    await world.destination("hook", concurrency=32)
    world.webhook.answer = lambda _: Answer(delay=0.01)
    events = [event(f"m{i}", f"user-{i % 40}") for i in range(1200)]
    one, two = router_process(world.database), router_process(world.database)
    try:
        # Both alive: the partitions are split between them.
        async def split() -> bool:
            counts = await owners(world.conn)
            return len([o for o in counts if o]) == 2 and "" not in counts
        await eventually(split, every=0.2)
        async with ingest(world.database) as service:
            ids = await send(service, world.source, events)
        await world.webhook.wait_for(lambda: len(world.webhook.oks) >= 300)
        one.kill()

        async def all_to_two() -> bool:
            counts = await owners(world.conn)
            return list(counts.values()) == [64] and "" not in counts
        await eventually(all_to_two, every=0.2)
        await wait_until_finished(world.conn, len(ids))
    finally:
        one.close()
        two.close()
    ids_by_user: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(events, ids, strict=True):
        ids_by_user[e.user_id].append(job_id)
    first_deliveries_in_order(ids_by_user, world.webhook.oks)
    # No ordering key was ever being delivered by both routers at the same time.
    assert world.webhook.max_open_per_user == 1


async def test_kill_9_between_delivering_and_recording_repeats_only_what_was_not_recorded(
    world: World,
) -> None:
    """A router killed after its deliveries were answered and before they were on record:
    its successor delivers those again (at least once), and nothing that was on record when
    it died: every duplicate the receiver sees is a delivery the database had no record of.
    Recording is held back (a long flush delay) so that many answered deliveries are still
    only in the dead router's memory."""
    await world.destination("hook", concurrency=8)
    events = [event(f"m{i}", f"user-{i % 20}") for i in range(600)]
    async with ingest(world.database) as service:
        ids = await send(service, world.source, events)
    first = router_process(world.database, RELAYQ_ROUTER_FLUSH_DELAY_MS="400")
    try:
        await world.webhook.wait_for(lambda: len(world.webhook.oks) >= 300)
        first.kill()
    finally:
        first.close()
    # Requests the dead router had sent may still be arriving: until the receiver is quiet.
    counts: list[int] = []

    async def quiet() -> bool:
        counts.append(len(world.webhook.received))
        return len(counts) > 3 and counts[-1] == counts[-4]

    await eventually(quiet, every=0.1, what="the receiver quiet after the kill")
    received_before = [r.job_id for r in world.webhook.oks]
    recorded_before = set(await recorded_attempts(world.conn))
    assert len(recorded_before) < len(set(received_before))  # some answered, unrecorded
    second = router_process(world.database)
    try:
        await wait_until_finished(world.conn, len(ids))
    finally:
        second.close()
    ids_by_user: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(events, ids, strict=True):
        ids_by_user[e.user_id].append(job_id)
    first_deliveries_in_order(ids_by_user, world.webhook.oks)
    assert set((await states(world.conn)).values()) == {"succeeded"}
    seen: dict[int, int] = defaultdict(int)
    for delivery in world.webhook.oks:
        seen[delivery.job_id] += 1
    assert set(seen) == set(ids)  # nothing lost
    duplicated = {job_id for job_id, times in seen.items() if times > 1}
    assert duplicated  # the unrecorded ones came again ...
    assert not duplicated & recorded_before  # ... and only those
    assert duplicated <= set(received_before)
