"""Pure logic of the router: retry policy, rate limiting, fair sharing of delivery capacity."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from jobsdb.catalog import Destination
from jobsdb.destinations import Connection
from jobsdb.eventlog import LoggedEvent, WantedFor
from jobsdb.queue import Candidate
from relayq import destination_types, endpoints
from router_service.fairness import FairScheduler
from router_service.lane import Lane, LaneSettings
from router_service.ratelimit import FLOOR, RateLimiter
from router_service.reads import Read
from router_service.retry import (
    RetryPolicy,
    Verdict,
    backoff_delay,
    classify_http,
    gives_up,
    parse_retry_after,
)
from router_service.routing import Routing
from router_service.senders import SENDERS
from router_service.tracks import Positions
from tests.poll import eventually

POLICY = RetryPolicy(min_backoff=1.0, max_backoff=60.0, max_attempts=5,
                     max_retry_window=timedelta(hours=1))
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("attempt", "base"), [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)])
def test_backoff_doubles_up_to_the_maximum_with_jitter(attempt: int, base: float) -> None:
    delays = [backoff_delay(POLICY, attempt, random.Random(seed)) for seed in range(200)]
    assert all(base / 2 <= d <= base for d in delays)
    assert max(delays) - min(delays) > base / 4  # jittered, not constant


def test_a_job_is_given_up_only_past_both_limits() -> None:
    first = NOW - timedelta(hours=2)
    assert not gives_up(POLICY, 4, first, NOW)  # window passed, attempts not
    assert not gives_up(POLICY, 9, NOW - timedelta(minutes=5), NOW)  # attempts passed, window not
    assert gives_up(POLICY, 5, first, NOW)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.OK), (204, Verdict.OK), (408, Verdict.RETRY), (429, Verdict.RETRY),
     (500, Verdict.RETRY), (503, Verdict.RETRY), (400, Verdict.ABORT), (401, Verdict.ABORT),
     (404, Verdict.ABORT), (422, Verdict.ABORT), (301, Verdict.ABORT)],
)
def test_http_statuses_are_told_apart(status: int, verdict: Verdict) -> None:
    assert classify_http(status) is verdict


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("0", 0.0), ("Wed, 25 Nov 2026 12:00:30 GMT", 30.0),
     ("Wed, 25 Nov 2026 11:00:00 GMT", 0.0), ("soon", None), ("", None), (None, None)],
)
def test_retry_after_is_read_as_seconds_or_a_date(header: str | None, seconds: float | None
                                                  ) -> None:
    assert parse_retry_after(header, NOW) == seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_configured_rate_is_a_token_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(10, 2, clock=clock)
    assert limiter.try_take() == 0  # the burst of two
    assert limiter.try_take() == 0
    assert limiter.try_take() == pytest.approx(0.1)
    clock.now += 0.1
    assert limiter.try_take() == 0


def test_a_batch_takes_a_token_per_job() -> None:
    """A gRPC or NATS delivery carries many jobs: the rate is jobs per second, not calls."""
    clock = Clock()
    limiter = RateLimiter(10, 5, clock=clock)
    assert limiter.take_up_to(100) == (5, 0.0)  # the burst, not the batch
    taken, wait = limiter.take_up_to(100)
    assert taken == 0
    assert wait == pytest.approx(0.1)
    clock.now += 0.35
    assert limiter.take_up_to(100) == (3, 0.0)
    limiter.give_back(2)  # two of them did not go after all
    assert limiter.take_up_to(100) == (2, 0.0)
    unlimited = RateLimiter()
    assert unlimited.take_up_to(100) == (100, 0.0)


def test_429_halves_the_rate_then_it_recovers_step_by_step() -> None:
    clock = Clock()
    limiter = RateLimiter(100, 10, clock=clock)
    limiter.too_many_requests(retry_after=2)
    assert limiter.rate == 50
    assert limiter.try_take() == pytest.approx(2.0)  # paused for the Retry-After
    clock.now += 2
    assert limiter.try_take() == 0
    clock.now += 3
    limiter.try_take()
    assert limiter.rate == pytest.approx(80)
    clock.now += 10
    limiter.try_take()
    assert limiter.rate == 100


def test_429_from_an_unlimited_destination_limits_it_from_what_it_received() -> None:
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    for _ in range(40):
        assert limiter.try_take() == 0
        clock.now += 0.01
    limiter.too_many_requests(retry_after=None)
    assert limiter.rate == pytest.approx(20)
    for _ in range(20):
        limiter.too_many_requests(retry_after=None)
    assert limiter.rate == FLOOR
    clock.now += 1000
    limiter.try_take()
    assert limiter.rate is None  # unlimited again


async def test_free_permits_go_round_robin_across_tenants_then_destinations() -> None:
    scheduler = FairScheduler(permits=1)
    await scheduler.acquire("a", "a1")  # the one permit, held
    order: list[str] = []

    async def want(tenant: str, destination: str) -> None:
        await scheduler.acquire(tenant, destination)
        order.append(destination)

    # Tenant a queues many requests first; b and c ask later.
    waiting = [asyncio.create_task(want("a", "a1")) for _ in range(3)]
    waiting += [asyncio.create_task(want("a", "a2")),
                asyncio.create_task(want("b", "b1")),
                asyncio.create_task(want("c", "c1"))]
    await asyncio.sleep(0)
    holders = ["a"]  # who holds the one permit, in the order it was granted
    for _ in range(len(waiting)):
        scheduler.release(holders.pop(0))
        await asyncio.sleep(0)
        holders.append(order[-1][0])
    await asyncio.gather(*waiting)
    # b and c are served after one of a's, not after all of a's backlog.
    assert order[:3] == ["a1", "b1", "c1"]
    assert order[3] == "a2"  # within a, its destinations take turns
    assert scheduler.waiting == 0


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    scheduler = FairScheduler(permits=1)
    await scheduler.acquire("a", "a1")
    task = asyncio.create_task(scheduler.acquire("b", "b1"))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    scheduler.release("a")
    assert scheduler.in_use == 0
    assert scheduler.waiting == 0


async def test_while_the_loop_runs_late_the_heaviest_of_several_tenants_is_held_back() -> None:
    """CPU, not permits, runs short under a flood: the loop's lag caps the tenant with the
    most in flight at half of it, a light tenant is never held back, and the cap grows back
    as the loop keeps up."""
    clock = Clock()
    scheduler = FairScheduler(permits=100, clock=clock)
    for _ in range(40):
        await scheduler.acquire("heavy", "h")
    await scheduler.acquire("light", "l")
    scheduler.loop_lag(0.020)  # late: the heavy one is capped at 20
    assert scheduler.caps == {"heavy": 20}
    held = asyncio.create_task(scheduler.acquire("heavy", "h"))
    await asyncio.sleep(0)
    assert not held.done()  # 40 in flight, cap 20: it waits though permits are free ...
    await scheduler.acquire("light", "l")  # ... while the light tenant goes at once
    for _ in range(21):
        scheduler.release("heavy")
    await asyncio.sleep(0)
    assert held.done()  # under its cap again: its turn
    scheduler.loop_lag(0.001)  # keeping up: the cap grows by a tenth
    assert scheduler.caps == {"heavy": 22}
    clock.now += 10  # only one tenant delivering: no cap at all
    scheduler.loop_lag(0.020)
    assert scheduler.caps == {}


async def test_one_tenant_alone_is_never_held_back() -> None:
    scheduler = FairScheduler(permits=100)
    for _ in range(50):
        await scheduler.acquire("only", "d")
    scheduler.loop_lag(0.5)
    assert scheduler.caps == {}


# ---- the lane's wake-ups ----


class GatedReader:
    """Holds the lane's first read open until released; it finds `first`, every later read
    finds nothing more."""

    def __init__(self, first: list[Candidate] | None = None) -> None:
        self.reads = 0
        self.release = asyncio.Event()
        self.first = first or []

    async def pickup(self, destination_key: int, limit: int, partitions: frozenset[int],
                     exclude: object) -> Read:
        self.reads += 1
        if self.reads == 1:
            await self.release.wait()
            return Read(self.first, complete=True)
        return Read([], complete=True)


async def test_a_notification_during_a_read_makes_the_lane_read_again() -> None:
    """The read's snapshot may predate the jobs the notification is about: a complete read
    must not cancel it (seen: the lane slept until the next poll)."""
    reader = GatedReader()
    membership: Any = SimpleNamespace(usable=lambda: frozenset(range(64)),
                                      may_deliver=lambda partition: True)
    # Only what a lane that reads and finds nothing touches.
    context: Any = SimpleNamespace(settings=LaneSettings(batch=500, max_held=2000),
                                   reader=reader, membership=membership,
                                   stopping=lambda: False, settled=lambda: None)
    sender: Any = SimpleNamespace(max_batch=1)
    lane = Lane(context, _destination(), sender)
    try:
        await eventually(lambda: reader.reads == 1, within=5, every=0.01,
                         what="the lane's first read")
        lane.notify()  # ingest committed jobs while the read was running
        reader.release.set()
        await eventually(lambda: reader.reads == 2, within=5, every=0.01,
                         what="a second read")
        assert reader.reads == 2
        assert not lane.dirty  # and then it rests: that read found everything
    finally:
        lane.task.cancel()
        await asyncio.gather(lane.task, return_exceptions=True)


async def test_a_read_that_ends_after_the_router_began_stopping_sends_nothing() -> None:
    """The router's stop waits only for deliveries in flight when it looks, then cancels the
    lanes: a delivery a lane started after that (its read was running when the stop began)
    reached the destination and was cancelled unrecorded, so the next owner of its partition
    delivered it again (seen: a job OK'd twice in a row in test_several_routers_...)."""
    reader = GatedReader([Candidate(1 << 16, "alice", "m1", "pending", 2, NOW, NOW, "{}", 0,
                                    None)])
    stopping = False
    sent: list[int] = []

    async def deliver(jobs: list[Any]) -> list[Any]:
        sent.extend(job.job_id for job in jobs)
        await asyncio.Event().wait()  # the destination never answers: the stop cancels it
        raise AssertionError

    async def acquire(tenant: object, destination: object) -> None:
        pass

    membership: Any = SimpleNamespace(usable=lambda: frozenset({0}),
                                      may_deliver=lambda partition: True)
    context: Any = SimpleNamespace(
        settings=LaneSettings(batch=500, max_held=2000), reader=reader, membership=membership,
        stopping=lambda: stopping, settled=lambda: None,
        scheduler=SimpleNamespace(acquire=acquire, release=lambda tenant: None),
        positions=Positions(), routing=lambda: Routing([Connection(7, 1, 1, None)]))
    async def close() -> None:
        pass

    sender: Any = SimpleNamespace(max_batch=1, per_user=1, max_bytes=None, deliver=deliver,
                                  close=close)
    lane = Lane(context, _destination(), sender)
    try:
        await eventually(lambda: reader.reads == 1, within=5, every=0.01,
                         what="the lane's first read")
        stopping = True  # Engine.stop begins, and finds nothing in flight
        reader.release.set()
        await eventually(lambda: lane.barrier.held, within=5, every=0.01,
                         what="the read's job taken in")
        await asyncio.sleep(0.05)  # what the lane does next, and a delivery's first steps
        assert sent == []
        assert lane.in_flight == 0
    finally:
        await lane.close()


def _destination() -> Destination:
    return Destination(
        destination_key=1, id="d", tenant_key=1, tenant_id="t", name="", type="grpc",
        endpoint="h:1", headers={}, min_backoff_ms=100, max_backoff_ms=1000, max_attempts=3,
        max_retry_window_s=60, rate_per_second=0.0, rate_burst=0, concurrency=4,
        timeout_ms=1000, paused=False, created_at=datetime.now(UTC),
        updated_at=datetime.now(UTC), circuit_after_s=600, circuit_min_failures=20,
        circuit_probe_s=30, circuit_opened_at=None, circuit_reason=None, batch_max_events=1,
        batch_max_bytes=1_048_576, batch_linger_ms=0)


class GatedLog:
    """The log's reads of a lagging destination: each held open until released."""

    def __init__(self, events: list[LoggedEvent]) -> None:
        self.events = events
        self.wanted: list[WantedFor] = []
        self.release = asyncio.Event()

    async def read_own(self, wanted: list[WantedFor]) -> list[LoggedEvent]:
        self.wanted += wanted
        await self.release.wait()
        return self.events

    def wake(self) -> None:
        pass


async def _reading_alone(positions: Positions
                         ) -> tuple[Lane, GatedLog, asyncio.Task[None]]:
    """A lane for destination 1 of source 7, lagging in partition 0 from 10, its loop
    stopped, and its own read of the log started and held open (the log will answer events
    12 and 15): the test changes what it likes, then releases the read."""
    now = datetime.now(UTC)
    log = GatedLog([LoggedEvent(e, 0, 7, 1, now, "alice", f"m{e}", None, "{}")
                    for e in (12, 15)])
    membership: Any = SimpleNamespace(usable=lambda: frozenset({0}))
    context: Any = SimpleNamespace(
        settings=LaneSettings(batch=500, max_held=2000), membership=membership,
        stopping=lambda: False, positions=positions, log=log,
        cursors=SimpleNamespace(changed=lambda: None), blocked={},
        routing=lambda: Routing([Connection(7, 1, 1, None)]))
    lane = Lane(context, _destination(), SimpleNamespace(max_batch=1))  # type: ignore[arg-type]
    lane.task.cancel()
    await asyncio.gather(lane.task, return_exceptions=True)
    reading = asyncio.create_task(lane._read_own())
    await eventually(lambda: log.wanted, within=5, every=0.01, what="the lane's read")
    return lane, log, reading


async def test_a_read_of_its_own_rewound_meanwhile_hands_the_lane_nothing_of_that_partition(
) -> None:
    """The lane lags in a partition and reads its share from 10; meanwhile a job of its
    below that (event 4) leaves memory undecided, so the partition is read again from 3.
    What the read found above 10 must not be taken in: it would go ahead of the user's jobs
    read again from 3 (seen: a user's later jobs delivered first, the earlier ones then
    parked behind the later one's failure, read again and parked again for good)."""
    positions = Positions()
    positions.take(0, 0, {}, {})
    positions.read_shared(0, 20)
    positions.held(1, 0, 4)  # handed to the lane by the shared read
    positions.lag(1, 0, 10)  # then it could not keep up: it reads (10, 20] on its own
    lane, log, reading = await _reading_alone(positions)
    assert [(w.after, w.upto) for w in log.wanted] == [(10, 20)]
    positions.forget(1, 0, 4)  # what the flusher's recorded() does for an undecided job
    log.release.set()
    await reading
    assert lane.barrier.held == {}
    assert not positions.is_held(1, 0, 12)
    assert positions.lagging(1) == {0: 3}


async def test_a_read_of_its_own_whose_partition_was_taken_again_meanwhile_hands_nothing(
) -> None:
    """The lane reads its share of a partition from 10; meanwhile the partition is lost and
    taken back, and the new taking starts from Postgres, where another router moved this
    destination's cursor to 15. The old read's events (12 and 15, which that router delivered)
    are not this taking's: nothing is taken in, and the lane reads on from 15."""
    positions = Positions()
    positions.take(0, 0, {}, {})
    positions.read_shared(0, 20)
    positions.lag(1, 0, 10)
    lane, log, reading = await _reading_alone(positions)
    positions.drop(0)
    positions.take(0, 15, {1: 15}, {})
    log.release.set()
    await reading
    assert lane.barrier.held == {}
    assert positions.lagging(1) == {0: 15}


@pytest.mark.parametrize(("text", "target", "tls"), [
    ("sink.local:7000", "sink.local:7000", False),
    ("grpc://sink.local:7000", "sink.local:7000", False),
    ("grpcs://sink.local:443", "sink.local:443", True),
    ("GRPCS://10.0.0.1:443", "10.0.0.1:443", True),
    ("grpcs://[::1]:8443", "[::1]:8443", True),
])
def test_grpc_endpoints_say_where_and_whether_tls(text: str, target: str, tls: bool) -> None:
    assert endpoints.parse_grpc(text) == endpoints.GrpcEndpoint(target, tls)


@pytest.mark.parametrize("text", ["sink.local", "https://sink:443", "grpcs://", "grpcs://h:0",
                                  "grpc://h:70000", "grpcs://h:443/path", "h:1 "])
def test_what_is_not_a_grpc_endpoint(text: str) -> None:
    with pytest.raises(endpoints.NotForGrpc, match="host:port"):
        endpoints.parse_grpc(text)


def test_headers_become_metadata_with_lower_case_names() -> None:
    assert endpoints.metadata({"Authorization": "Bearer k", "x-tenant": "a"}) == (
        ("authorization", "Bearer k"), ("x-tenant", "a"))
    for bad, reason in [({"grpc-status": "0"}, "reserved"), ({"TE": "x"}, "reserved"),
                        ({"k-bin": "x"}, "binary"), ({"A": "1", "a": "2"}, "one metadata key"),
                        ({"a": "\u00e9"}, "printable ASCII"), ({"a": "x\ty"}, "printable"),
                        ({"X-Api+Key": "x"}, "metadata names are letters")]:
        with pytest.raises(endpoints.NotForGrpc, match=reason):
            endpoints.metadata(bad)


def test_the_router_sends_what_grpc_can_carry_of_an_old_row() -> None:
    usable, refused = endpoints.split_metadata(
        {"Authorization": "k", "authorization": "k2", "grpc-status": "0", "X-Ok": "1"})
    assert usable == (("authorization", "k"), ("x-ok", "1"))
    assert refused == ["headers 'Authorization' and 'authorization' are one metadata key",
                       "header 'grpc-status' is reserved by gRPC"]


def test_the_router_has_a_sender_for_every_destination_type_admin_accepts() -> None:
    assert set(SENDERS) == set(destination_types.TYPES)


async def test_a_partition_lost_and_taken_back_in_one_heartbeat_is_read_again_from_postgres(
) -> None:
    """Another router held it meanwhile and the same router took it back: what the router
    did meanwhile was fenced, so its memory of that partition is dropped and the
    partition taken over from what Postgres has, like any partition newly gained; one kept
    all along stays as it is (the chaos soak's lost events, issue 16)."""
    from psycopg_pool import AsyncConnectionPool

    from router_service.engine import Engine
    from router_service.settings import EngineSettings

    pool = AsyncConnectionPool("postgresql://unused", open=False)
    engine = Engine(pool, EngineSettings(
        router_id="r", lease=timedelta(seconds=5), batch=10, max_held=10, permits=4,
        grpc_batch=1, poll_seconds=1.0, flush_delay=0.01, flush_max=10),
        lease_pool=pool)
    engine.stopping = True  # the take-over it starts ends at once: nothing to read from
    engine.discover = lambda: None  # type: ignore[method-assign]
    engine.membership.owned = {1, 2}
    for partition in (1, 2):
        engine.positions.take(partition, 100, {}, {})
        engine.positions.read_shared(partition, 150)
    engine._partitions_changed({1}, {1})
    assert not engine.positions.reading(1)
    assert engine._taking == {1}
    assert engine.positions.position[2] == 150
    await asyncio.sleep(0)
