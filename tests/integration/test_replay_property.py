"""A property test of replays and backfills (issue 18) under live traffic, random failures and
aborts, with the real services and a real receiver, a fresh database per example:

- the events a replay takes are exactly those an evaluation in Python of its range and
  filter (and the connection's filter) picks from the log;
- every one of them, and every live event, arrives at the destination (except those the
  receiver refuses for good: aborted), none is missing;
- each user's events arrive in log order (first arrivals: a repeat is only ever a delivery
  whose record was lost, and there is no crash here, so there are none).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filterlang.events import compile_event_filter
from relayq.v1 import admin_pb2
from tests import factories
from tests.databases import create_database, drop_database, dsn_for
from tests.helpers import event
from tests.pipeline import _document, send
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router
from tests.sinks import OK, Answer, Received, WebhookSink

AUTH = Admin.auth()
FILTERS = ("", "properties.n >= 5", "properties.n < 3 OR user_id = 'u1'",
           "NOT properties.kind = 'b'")


@dataclass(frozen=True)
class Scenario:
    kind: str  # "replay" or "backfill"
    users: int
    past: int
    live: int
    # The replay's id range, as fractions of the past events.
    start: float
    end: float
    filter: str
    connection_filter: str
    # Chance of a 503 on an attempt, and of a message refused for good (400: aborted).
    fail: float
    abort: float
    seed: int


scenarios = st.builds(
    Scenario,
    kind=st.sampled_from(("replay", "backfill")),
    users=st.integers(1, 5),
    past=st.integers(1, 25),
    live=st.integers(0, 15),
    start=st.floats(0, 1),
    end=st.floats(0, 1),
    filter=st.sampled_from(FILTERS),
    connection_filter=st.sampled_from(("", "NOT properties.n = 7")),
    fail=st.sampled_from((0.0, 0.3)),
    abort=st.sampled_from((0.0, 0.1)),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios)
def test_replays_and_backfills_deliver_exactly_the_range_in_order(
        template_database: str, scenario: Scenario) -> None:
    name = create_database(template_database)
    try:
        asyncio.run(_run(dsn_for(name), scenario))
    finally:
        drop_database(name)


def _matches(text: str, e: Any) -> bool:
    compiled = compile_event_filter(text) if text else None
    return compiled is None or compiled.matches(_document(e))


async def _run(database: str, s: Scenario) -> None:
    rng = random.Random(s.seed)
    refused = {f"p{i}" for i in range(s.past) if rng.random() < s.abort}
    refused |= {f"l{i}" for i in range(s.live) if rng.random() < s.abort}

    def answer(delivery: Received) -> Answer:
        if delivery.message_id in refused:
            return Answer(400, body="refused")
        return Answer(503) if rng.random() < s.fail else OK

    sink = WebhookSink()
    sink.answer = answer
    await sink.start()
    try:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            tenant = await factories.tenant(conn)
            source = await factories.source(conn, tenant)
            key = await factories.destination(conn, tenant, "hook", endpoint=sink.url,
                                              kind="webhook", min_backoff_ms=20,
                                              max_backoff_ms=100, max_attempts=50)
            if s.kind == "replay":
                await factories.connect(conn, source.key, key)
                await conn.execute("UPDATE connections SET event_filter = %s",
                                   (s.connection_filter or None,))
            past = [event(f"p{i}", f"u{i % s.users}", n=i % 10, kind="ab"[i % 2])
                    for i in range(s.past)]
            live = [event(f"l{i}", f"u{i % s.users}", n=i % 10, kind="ab"[i % 2])
                    for i in range(s.live)]
            async with ingest(database) as service, router(database), \
                    admin(database) as adm:
                await send(service, source, past)
                cur = await conn.execute("SELECT message_id, event_id FROM events ORDER BY 2")
                ids = dict(await cur.fetchall())
                if s.kind == "replay":
                    taken = [e for e in past if _matches(s.connection_filter, e)]
                    await _delivered(sink, {e.message_id for e in taken} - refused)
                    # The refused ones answered too (their aborts then on record before the
                    # destination's place passes them, which the replay waits for).
                    await sink.wait_for(lambda: {e.message_id for e in taken}
                                        <= {r.message_id for r in sink.received})
                    low, high = sorted((s.start, s.end))
                    first = ids[past[int(low * (s.past - 1))].message_id]
                    last = ids[past[int(high * (s.past - 1))].message_id]
                    expected = [e for e in taken if first <= ids[e.message_id] <= last
                                and _matches(s.filter, e)]
                    mark, mark_oks = len(sink.received), len(sink.oks)
                    started = await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
                        source_id="web", destination_id="hook", from_event_id=first,
                        to_event_id=last, filter=s.filter, reason="property"),
                        metadata=AUTH)
                    assert started.matched == len(expected)
                    replay_id = started.replay.replay_id
                    live_expected = [e for e in live if _matches(s.connection_filter, e)]
                else:
                    connected = await adm.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
                        source_id="web", destination_id="hook", backfill_from="earliest",
                        filter=s.connection_filter), metadata=AUTH)
                    replay_id = connected.backfill_id
                    expected = [e for e in past if _matches(s.connection_filter, e)]
                    mark = mark_oks = 0
                    live_expected = [e for e in live if _matches(s.connection_filter, e)]
                await send(service, source, live)
                await _finished(adm, replay_id, expected, refused)
                await _delivered(sink, {e.message_id for e in expected + live_expected}
                                 - refused)
    finally:
        await sink.stop()

    replayed = [r for r in sink.received[mark:] if r.message_id.startswith("p")]
    assert {r.message_id for r in replayed} == {e.message_id for e in expected}, s
    order = {e.message_id: n for n, e in enumerate(past + live)}
    oks = sink.oks[mark_oks:]
    if s.kind == "replay":
        # A replay's events in their order; live ones in theirs (a replay of older events
        # does not hold newer live ones back, unless one of them fails: then they wait).
        _in_order(s, [r for r in oks if r.message_id.startswith("p")], order)
        _in_order(s, [r for r in oks if r.message_id.startswith("l")], order)
    else:
        # A backfill's events, then the live ones: one order across the switch.
        _in_order(s, oks, order)


def _in_order(s: Scenario, oks: list[Received], order: dict[str, int]) -> None:
    users: dict[str, list[int]] = {}
    firsts: set[str] = set()
    for r in oks:
        if r.message_id not in firsts:
            firsts.add(r.message_id)
            users.setdefault(r.user_id, []).append(order[r.message_id])
    for user, ranks in users.items():
        assert ranks == sorted(ranks), (s, user, ranks)


async def _finished(adm: Admin, replay_id: str, expected: list[Any], refused: set[str]
                    ) -> None:
    found: admin_pb2.Replay | None = None

    async def done() -> bool:
        nonlocal found
        found = await adm.stub.GetReplay(admin_pb2.GetReplayRequest(replay_id=replay_id),
                                         metadata=AUTH)
        return found.state == "done" and found.pending == 0

    await eventually(done, within=120, what=lambda: f"{replay_id} ending: {found}")
    assert found is not None
    assert found.written == len(expected)


async def _delivered(sink: WebhookSink, names: set[str]) -> None:
    await sink.wait_for(lambda: names <= {r.message_id for r in sink.oks}, within=120)
