"""Pure logic of ingest: validation and document building, group-commit scheduling."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest_service import validate
from ingest_service.committer import EventsRefused, GroupCommitter
from ingest_service.config import Limits
from ingest_service.quota import MAX_WAIT, SourceQuotas
from ingest_service.service import IngestServicer
from ingest_service.validate import EventRejected, build_event, prepare
from jobsdb import errors as dberrors
from jobsdb.ingest import NewEvent, Stored
from jobsdb.write_keys import SourceRoute
from relayq.logs import Throttled
from relayq.rpc import InvalidArgument
from relayq.v1 import ingest_pb2

ROUTE = SourceRoute(source_key=3, source_id="web", tenant_key=1, tenant_id="acme",
                    enabled=True, rate_per_second=0.0, rate_burst=0,
                    destinations={"d1": 10, "d2": 11},
                    destination_keys=(10, 11))
LIMITS = Limits(max_batch_events=100, max_event_bytes=2048, max_request_bytes=1 << 20)
NOW = "2026-11-25T10:00:00.000Z"


def build(**fields: object) -> NewEvent:
    return build_event(ingest_pb2.Event(**fields), ROUTE, LIMITS, NOW)  # type: ignore[arg-type]


def test_the_document_carries_the_envelope_and_the_properties() -> None:
    event = build(message_id="m1", user_id="u1", anonymous_id="a1", type="track",
                  event="Signed Up", payload_json='{"plan": "pro", "n": 10000000000000000000001}')
    assert event.user_id == "u1"
    # Named none: for every connection of the source, which the routers look up when they
    # read the event (ingest no longer lists the connected destinations per event).
    assert event.destinations is None
    assert json.loads(event.document) == {
        "messageId": "m1", "type": "track", "event": "Signed Up", "userId": "u1",
        "anonymousId": "a1", "timestamp": NOW, "receivedAt": NOW,
        "properties": {"plan": "pro", "n": 10000000000000000000001},
    }


def test_the_context_goes_beside_the_properties_as_sent() -> None:
    event = build(message_id="m1", user_id="u1", payload_json='{"a": 1}',
                  context_json='{"library": {"name": "relayq", "version": "0.1.0"}}')
    assert event.document.endswith(
        ',"properties":{"a": 1},"context":{"library": {"name": "relayq", "version": "0.1.0"}}}')
    assert json.loads(event.document)["context"]["library"]["name"] == "relayq"


def test_anonymous_id_is_the_ordering_key_without_a_user_id() -> None:
    assert build(message_id="m", anonymous_id="anon").user_id == "anon"


def test_valid_json_that_orjson_refuses_is_still_accepted() -> None:
    event = build(message_id="m", user_id="u", payload_json='{"big": 1e400}')
    assert event.document.endswith('"properties":{"big": 1e400}}')


@pytest.mark.parametrize(("text", "suspect"), [
    ('{"n": 1e12345}', True),
    ('{"n":[-1.5E-00001]}', True),
    ('{"a": 1,\n"n":\t0e+99999}', True),
    ('{"checkout_id": "9be12345f0a1c2d3"}', False),  # a hex id: inside a string
    ('{"sku": "lot-3e123456"}', False),
    ('{"note": "see 1e99999"}', True),  # looks like a number: the exact check decides
    ('{"n": 1.5e300}', False),
])
def test_the_long_exponent_screen_skips_strings_that_cannot_be_numbers(text: str,
                                                                       suspect: bool) -> None:
    """Only a screen (the standard library's exact check follows a yes), but it must never
    say no to a number, and should say it to hex ids, common in real payloads."""
    assert validate._long_exponent(text) is suspect


def test_a_number_beyond_postgres_is_refused_and_a_hex_id_like_it_is_not() -> None:
    with pytest.raises(EventRejected, match="beyond what Postgres can store"):
        build(message_id="m", user_id="u", payload_json='{"n": 1e-99999}')
    event = build(message_id="m", user_id="u", payload_json='{"id": "0e99999"}')
    assert json.loads(event.document)["properties"] == {"id": "0e99999"}


def test_an_event_without_a_body_has_empty_properties() -> None:
    assert orjson.loads(build(message_id="m", user_id="u").document)["properties"] == {}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"user_id": "u"}, "message_id: required"),
        ({"message_id": "m"}, "user_id: one of user_id or anonymous_id is required"),
        ({"message_id": "m", "user_id": "u\t"}, "user_id: contains control characters"),
        ({"message_id": "m", "anonymous_id": "a" * 257}, "anonymous_id: longer than 256"),
        ({"message_id": "m", "user_id": "u", "event": "e" * 257}, "event: longer than 256"),
        ({"message_id": "m", "user_id": "u", "payload_json": "null"},
         "payload_json: must be a JSON object, got NoneType"),
        ({"message_id": "m", "user_id": "u", "payload_json": '{"a": NaN}'},
         "payload_json: invalid JSON"),
        ({"message_id": "m", "user_id": "u", "payload_json": '{"a": "\\udc00"}'},
         "payload_json: invalid JSON: invalid high surrogate"),
        ({"message_id": "m", "user_id": "u", "payload_json": '{"a": "x' + "y" * 2100 + '"}'},
         "payload_json: 2110 characters, over the limit of 2048"),
        ({"message_id": "m", "user_id": "u", "payload_json": '{"a": "' + "y" * 1990 + '"}'},
         "event: 2122 bytes exceed the limit of 2048 (RELAYQ_INGEST_MAX_EVENT_BYTES)"),
        ({"message_id": "m", "user_id": "u", "context_json": "[1]"},
         "context_json: must be a JSON object, got list"),
        ({"message_id": "m", "user_id": "u", "context_json": "{"},
         "context_json: invalid JSON"),
        ({"message_id": "m", "user_id": "u", "payload_json": '{"a": "' + "y" * 1000 + '"}',
          "context_json": '{"b": "' + "y" * 1000 + '"}'},
         "event: 2152 bytes exceed the limit of 2048 (RELAYQ_INGEST_MAX_EVENT_BYTES)"),
        ({"message_id": "m", "user_id": "u", "destination_ids": ["d9"]},
         "destination_ids: 'd9' is not a destination connected to source 'web'"),
    ],
)
def test_invalid_events_are_rejected_with_a_reason(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(EventRejected) as caught:
        build(**fields)
    assert reason in str(caught.value)


def test_a_payload_nested_past_the_depth_limit_is_rejected_not_a_crash() -> None:
    """orjson stops at 1,024 levels; the standard library, tried next, runs out of stack."""
    text = '{"a":' + "[" * 1100 + "]" * 1100 + "}"
    limits = Limits(max_batch_events=1, max_event_bytes=8192, max_request_bytes=1 << 20)
    with pytest.raises(EventRejected, match="payload_json: invalid JSON: depth limit exceeded"):
        build_event(ingest_pb2.Event(message_id="m", user_id="u", payload_json=text),
                    ROUTE, limits, NOW)


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    event = build(message_id="m", user_id="u", payload_json='{"path": "C:\\\\u0000"}')
    assert orjson.loads(event.document)["properties"] == {"path": "C:\\u0000"}


def test_named_destinations_are_deduplicated_in_order() -> None:
    event = build(message_id="m", user_id="u", destination_ids=["d2", "d1", "d2"])
    assert event.destinations == (11, 10)


def test_prepare_collects_per_event_reasons_and_refuses_bad_batches() -> None:
    request = ingest_pb2.IngestRequest(events=[
        ingest_pb2.Event(message_id="a", user_id="u"),
        ingest_pb2.Event(message_id="b"),
    ])
    prepared = prepare(request, ROUTE, LIMITS, NOW)
    assert [i for i, _ in prepared.events] == [0]
    assert prepared.rejected == {1: "user_id: one of user_id or anonymous_id is required"}
    with pytest.raises(InvalidArgument, match="the batch is empty"):
        prepare(ingest_pb2.IngestRequest(), ROUTE, LIMITS, NOW)


@given(st.text(max_size=300))
def test_any_payload_text_is_accepted_or_rejected_never_crashes(text: str) -> None:
    try:
        event = build(message_id="m", user_id="u", payload_json=text)
    except EventRejected:
        return
    assert isinstance(json.loads(event.document)["properties"], dict)


# --- group commit scheduling (a recording store: this tests the scheduler, not Postgres) ---

def _events(n: int) -> list[NewEvent]:
    return [NewEvent(1, 1, f"m{i}", "u", "{}", (1,)) for i in range(n)]


async def test_requests_arriving_together_share_one_flush() -> None:
    flushes: list[int] = []

    async def store(events: Sequence[NewEvent]) -> list[Stored]:
        flushes.append(len(events))
        await asyncio.sleep(0.01)
        return [Stored(duplicate=False, event_id=1) for _ in events]

    committer = GroupCommitter(store, delay=0.02, max_jobs=1000, concurrency=1)
    committer.start()
    results = await asyncio.gather(*(committer.submit(_events(2)) for _ in range(50)))
    await committer.close()
    assert all(len(r) == 2 for r in results)
    assert sum(flushes) == 100
    assert len(flushes) <= 3


async def test_an_idle_committer_flushes_a_request_at_once() -> None:
    """Nothing being flushed: waiting the delay could only add latency (a client sending now
    and then would pay it on every request). Requests that come while a flush is in flight
    gather for the next one."""
    flushes: list[int] = []
    release = asyncio.Event()

    async def store(events: Sequence[NewEvent]) -> list[Stored]:
        flushes.append(len(events))
        if len(flushes) == 1:
            await release.wait()
        return [Stored(duplicate=False, event_id=1) for _ in events]

    committer = GroupCommitter(store, delay=10.0, max_jobs=1000, concurrency=1,
                               light_max_jobs=0)
    committer.start()
    first = asyncio.create_task(committer.submit(_events(1)))
    await asyncio.sleep(0.05)
    assert flushes == [1]  # at once, not after the 10 s delay
    later = [asyncio.create_task(committer.submit(_events(1))) for _ in range(3)]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 5)
    await committer.close()
    assert flushes == [1, 3]  # the three that came meanwhile shared the next flush


async def test_a_store_that_fails_unexpectedly_fails_its_requests_at_once() -> None:
    """A fault that is not Postgres's answer (a bug) must not leave clients waiting for
    their deadlines with nothing left to answer them; the committer goes on."""
    calls = 0

    async def store(events: Sequence[NewEvent]) -> list[Stored]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TypeError("a bug")
        return [Stored(duplicate=False, event_id=n + 1) for n, _ in enumerate(events)]

    committer = GroupCommitter(store, delay=0.01, max_jobs=1000, concurrency=1)
    committer.start()
    with pytest.raises(TypeError, match="a bug"):
        await asyncio.wait_for(committer.submit(_events(2)), 5)
    assert await asyncio.wait_for(committer.submit(_events(1)), 5) == [
        Stored(duplicate=False, event_id=1)]
    await committer.close()


async def test_a_flush_never_takes_more_than_max_jobs() -> None:
    flushes: list[int] = []

    async def store(events: Sequence[NewEvent]) -> list[Stored]:
        flushes.append(len(events))
        return [Stored(duplicate=False) for _ in events]

    committer = GroupCommitter(store, delay=0.05, max_jobs=10, concurrency=2)
    committer.start()
    await asyncio.gather(*(committer.submit(_events(3)) for _ in range(20)))
    await committer.close()
    assert sum(flushes) == 60
    assert max(flushes) <= 9


class _HeldStore:
    """A store that notes each flush's events as (source, message id) and holds it until the
    test releases it: what is flushed together, and when, is then the test's to see."""

    def __init__(self) -> None:
        self.flushes: list[list[tuple[int, str]]] = []
        self.gates: list[asyncio.Event] = []
        self._changed = asyncio.Condition()
        self._open = False

    async def __call__(self, events: Sequence[NewEvent]) -> list[Stored]:
        gate = asyncio.Event()
        if self._open:
            gate.set()
        self.gates.append(gate)
        self.flushes.append([(e.source_key, e.message_id) for e in events])
        async with self._changed:
            self._changed.notify_all()
        await gate.wait()
        return [Stored(duplicate=False, event_id=1) for _ in events]

    async def started(self, count: int) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.flushes) >= count), 5)

    def release(self, *, from_now_on: bool = False) -> None:
        """Let every flush begun so far end (and, from_now_on, every later one at once)."""
        self._open = from_now_on
        for gate in self.gates:
            gate.set()


def _from(source: int, prefix: str, n: int) -> list[NewEvent]:
    return [NewEvent(source, 1, f"{prefix}{i}", "u", "{}", (1,)) for i in range(n)]


async def test_a_light_request_is_flushed_alone_while_another_source_holds_every_slot() -> None:
    """Tenant B's occasional small request neither waits behind tenant A's flushes nor
    shares one with A's thousands of jobs (issue 13, item 6)."""
    store = _HeldStore()
    committer = GroupCommitter(store, delay=0.001, max_jobs=600, concurrency=2)
    committer.start()
    flood = [asyncio.create_task(committer.submit(_from(1, f"a{r}-", 300))) for r in range(10)]
    await store.started(2)  # both general slots hold A's flushes, six requests of A wait
    light = asyncio.create_task(committer.submit(_from(2, "b", 5)))
    await store.started(3)
    assert store.flushes[2] == [(2, f"b{i}") for i in range(5)]
    store.gates[2].set()
    assert len(await asyncio.wait_for(light, 5)) == 5
    assert not any(task.done() for task in flood)
    store.release(from_now_on=True)
    await asyncio.gather(*flood)
    await committer.close()
    assert sorted(len(f) for f in store.flushes) == [5, 600, 600, 600, 600, 600]


async def test_waiting_requests_are_taken_in_turns_by_source() -> None:
    """One request of each source per turn: C's first request is in the first flush although
    A queued five before it."""
    store = _HeldStore()
    committer = GroupCommitter(store, delay=0.01, max_jobs=400, concurrency=1)
    committer.start()
    submitted = [committer.submit(_from(1, f"a{r}-", 200)) for r in range(5)]
    submitted += [committer.submit(_from(3, f"c{r}-", 200)) for r in range(2)]
    everything = asyncio.gather(*submitted)
    for flushes in range(1, 5):
        await store.started(flushes)
        store.release()
    await everything
    await committer.close()
    requests = [sorted({message_id.split("-")[0] for _, message_id in f})
                for f in store.flushes]
    assert requests == [["a0", "c0"], ["a1", "c1"], ["a2", "a3"], ["a4"]]


async def test_a_source_that_sends_more_keeps_its_order_and_leaves_the_express_slot() -> None:
    """R1 waits as light; R2 of the same source arrives before R1 is flushed: R1 is no longer
    light, and is flushed with or before R2, never after it."""
    store = _HeldStore()
    committer = GroupCommitter(store, delay=0.01, max_jobs=1000, concurrency=1)
    committer.start()
    holder = asyncio.create_task(committer.submit(_from(9, "y", 200)))
    await store.started(1)  # the one general slot is busy; the express slot is free
    first = asyncio.create_task(committer.submit(_from(5, "r1-", 3)))
    second = asyncio.create_task(committer.submit(_from(5, "r2-", 3)))
    await asyncio.sleep(0.05)  # far past the delay: an express flush of R1 would have begun
    assert len(store.flushes) == 1
    store.release()
    await store.started(2)
    store.release()
    await asyncio.gather(holder, first, second)
    await committer.close()
    assert [m for _, m in store.flushes[1]] == [f"r1-{i}" for i in range(3)] + [
        f"r2-{i}" for i in range(3)]


async def test_a_refused_flush_with_no_event_to_blame_is_retried_request_by_request() -> None:
    """One client's bad data must fail that client only, not everyone sharing the commit, and
    cost the others one retry each at most."""
    flushes: list[list[str]] = []

    async def store(events: Sequence[NewEvent]) -> list[Stored]:
        flushes.append([e.message_id for e in events])
        if any(e.message_id == "poison" for e in events):
            raise dberrors.ConstraintViolation("refused")
        return [Stored(duplicate=False) for _ in events]

    committer = GroupCommitter(store, delay=0.02, max_jobs=1000, concurrency=1)
    committer.start()
    poison = [NewEvent(1, 1, "poison", "u", "{}", (1,))]
    results = await asyncio.gather(
        committer.submit(_events(1)), committer.submit(poison), committer.submit(_events(1)),
        return_exceptions=True)
    await committer.close()
    assert isinstance(results[1], dberrors.ConstraintViolation)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)
    assert flushes == [["m0", "poison", "m0"], ["m0"], ["poison"], ["m0"]]


async def test_events_postgres_refuses_in_a_flush_are_named_and_the_rest_stored_once(
        caplog: pytest.LogCaptureFixture) -> None:
    flushes: list[list[str]] = []

    async def store(events: Sequence[NewEvent]) -> list[Stored]:
        flushes.append([e.message_id for e in events])
        if any(e.document == "poison" for e in events):
            raise dberrors.ConstraintViolation("value overflows numeric format")
        return [Stored(duplicate=False) for _ in events]

    async def probe(events: Sequence[NewEvent]) -> dict[int, str]:
        return {i: "overflow" for i, e in enumerate(events) if e.document == "poison"}

    committer = GroupCommitter(store, delay=0.05, max_jobs=1000, concurrency=1, probe=probe)
    committer.start()
    poisoned = [NewEvent(1, 1, "p0", "u", "{}", (1,)), NewEvent(1, 1, "p1", "u", "poison", (1,))]
    with caplog.at_level(logging.WARNING, "ingest_service.committer"):
        results = await asyncio.gather(
            committer.submit([NewEvent(1, 1, "a", "u", "{}", (1,))]), committer.submit(poisoned),
            committer.submit([NewEvent(1, 1, "b", "u", "{}", (1,))]), return_exceptions=True)
        for round_ in range(20):  # a flood of refusals: logged once per interval, not each
            with pytest.raises(EventsRefused):
                await committer.submit([NewEvent(1, 1, f"x{round_}", "u", "poison", (1,))])
    await committer.close()
    refused = results[1]
    assert isinstance(refused, EventsRefused)
    assert refused.refused == {1: "overflow"}
    assert results[0] == [Stored(duplicate=False)]
    assert results[2] == [Stored(duplicate=False)]
    # The flush, then the two innocent requests together: one retry, shared.
    assert flushes[:2] == [["a", "p0", "p1", "b"], ["a", "b"]]
    assert len(caplog.records) == 1


def test_a_throttled_warning_logs_once_per_interval_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttled = Throttled(logging.getLogger("t"), 10.0, clock)
    with caplog.at_level(logging.WARNING, "t"):
        assert throttled.warning("bad %s", 1)
        assert not any([throttled.warning("bad %s", n) for n in range(5)])
        clock.now += 10
        assert throttled.warning("bad %s", 7)
    assert [r.getMessage() for r in caplog.records] == ["bad 1", "bad 7"]
    assert caplog.records[1].left_out == 5


# ---- per-source rate limits ----


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_source_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    quotas = SourceQuotas(clock)
    assert quotas.take(1, 10.0, 20, 20) == 0  # the whole burst at once
    assert quotas.take(1, 10.0, 20, 5) == pytest.approx(0.5)  # 5 tokens at 10/s
    clock.now += 0.5
    assert quotas.take(1, 10.0, 20, 5) == 0
    assert quotas.take(2, 10.0, 20, 20) == 0  # another source has its own bucket
    assert quotas.take(3, 0.0, 0, 10_000) == 0  # 0: unlimited


def test_a_batch_larger_than_the_burst_goes_when_full_and_leaves_debt() -> None:
    clock = Clock()
    quotas = SourceQuotas(clock)
    assert quotas.take(1, 10.0, 0, 100) == 0  # burst defaults to one second's worth: 10
    # 90 tokens of debt, then 1 token needed: 9.1 s at 10/s.
    assert quotas.take(1, 10.0, 0, 1) == pytest.approx(9.1)
    clock.now += 9.1
    assert quotas.take(1, 10.0, 0, 1) == 0


def test_a_changed_limit_keeps_what_the_source_owes() -> None:
    clock = Clock()
    quotas = SourceQuotas(clock)
    assert quotas.take(1, 100.0, 10, 1000) == 0  # 990 tokens of debt
    # Lowered to 1/s: the debt is not forgiven, it is now paid at the new rate.
    assert quotas.take(1, 1.0, 0, 1) == pytest.approx(991.0)
    # Raised: paid off faster.
    assert quotas.take(1, 1000.0, 10, 1) == pytest.approx(0.991)
    clock.now += 1.0
    assert quotas.take(1, 1000.0, 10, 1) == 0


def test_a_refusal_never_asks_for_more_than_an_hour_and_a_failed_store_gives_back() -> None:
    clock = Clock()
    quotas = SourceQuotas(clock)
    assert quotas.take(1, 1e-300, 1, 1) == 0
    assert quotas.take(1, 1e-300, 1, 1) == MAX_WAIT
    assert quotas.take(2, 1.0, 5, 5) == 0
    quotas.give_back(2, 5)  # the batch was not stored
    assert quotas.take(2, 1.0, 5, 5) == 0


class _RefusingCommitter:
    """Refuses every event whose document is "poison", as the group committer reports it."""

    def __init__(self) -> None:
        self.stored: list[list[str]] = []

    async def submit(self, events: Sequence[NewEvent]) -> list[Stored]:
        refused = {i: "payload: Postgres refuses it: overflow"
                   for i, e in enumerate(events) if e.document == "poison"}
        if refused:
            raise EventsRefused(refused)
        self.stored.append([e.message_id for e in events])
        return [Stored(duplicate=False, event_id=n + 1) for n, _ in enumerate(events)]


@pytest.mark.parametrize("partial", [False, True])
async def test_events_the_committer_refuses_are_named_like_invalid_events(partial: bool) -> None:
    committer = _RefusingCommitter()
    servicer = IngestServicer(None, committer, LIMITS)  # type: ignore[arg-type]
    request = ingest_pb2.IngestRequest(partial_success=partial, events=[
        ingest_pb2.Event(message_id=m, user_id="u") for m in ("a", "b", "c")])
    prepared = prepare(request, ROUTE, LIMITS, NOW)
    prepared.events[1] = (1, prepared.events[1][1]._replace(document="poison"))
    if not partial:
        with pytest.raises(InvalidArgument, match=r"events\[1\]\.payload: Postgres refuses it"):
            await servicer._store(request, prepared)
        assert committer.stored == []
        return
    stored = await servicer._store(request, prepared)
    assert committer.stored == [["a", "c"]]
    assert len(stored) == 2
    assert prepared.rejected == {1: "payload: Postgres refuses it: overflow"}
