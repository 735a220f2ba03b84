"""The circuit breaker: the pure rule (router_service.circuit), and a real router opening,
probing and closing a destination's circuit against a real webhook receiver."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc
import pytest

from relayq.v1 import admin_pb2, router_pb2
from router_service.circuit import Breaker, Change, CircuitPolicy
from router_service.retry import Result, Verdict
from tests.helpers import event
from tests.pipeline import World, send, states, wait_until_finished
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router
from tests.sinks import OK, Answer

POLICY = CircuitPolicy(open_after=10.0, min_failures=3, probe_every=5.0)
FAIL = Result(Verdict.RETRY, "503")
SUCCESS = Result(Verdict.OK)


# ---- the rule ----


def test_it_opens_only_after_failing_for_the_period_and_the_attempts() -> None:
    breaker = Breaker(POLICY)
    assert breaker.record(FAIL, 0.0) is None
    assert breaker.record(FAIL, 9.0) is None  # 2 attempts, 9 s: not yet
    assert breaker.record(FAIL, 9.5) is None  # 3 attempts, 9.5 s: not yet
    assert breaker.record(FAIL, 10.0) is Change.OPENED
    assert breaker.is_open
    assert "every attempt failed for 10s or more (4 attempts); last error: 503" in breaker.reason


def test_any_sign_of_life_ends_the_streak() -> None:
    breaker = Breaker(POLICY)
    breaker.record(FAIL, 0.0)
    breaker.record(FAIL, 5.0)
    breaker.record(Result(Verdict.ABORT, "404"), 6.0)  # it answers: it is up
    breaker.record(FAIL, 11.0)
    assert breaker.record(FAIL, 12.0) is None  # a new streak, 1 s old
    breaker.record(SUCCESS, 13.0)
    assert breaker.record(FAIL, 30.0) is None


def test_being_paced_is_not_failing() -> None:
    breaker = Breaker(POLICY)
    for second in range(20):
        assert breaker.record(Result(Verdict.RETRY, "429", retry_after=1.0), second) is None
    assert not breaker.is_open


def test_open_it_probes_once_per_interval_and_a_success_closes_it() -> None:
    breaker = Breaker(POLICY)
    for second in (0.0, 5.0, 10.0):
        breaker.record(FAIL, second)
    assert breaker.is_open
    assert breaker.probe_wait(10.0) == 5.0  # the first probe waits an interval
    assert breaker.probe_wait(15.0) == 0.0
    breaker.probed(15.0)
    assert breaker.probe_wait(16.0) == 4.0
    assert breaker.record(FAIL, 16.0) is None  # a failed probe: still open
    assert breaker.record(SUCCESS, 20.0) is Change.CLOSED
    assert breaker.probe_wait(20.0) == 0.0


def test_open_after_zero_never_opens_by_itself() -> None:
    breaker = Breaker(CircuitPolicy(open_after=0, min_failures=1, probe_every=1))
    for second in range(100):
        assert breaker.record(FAIL, second) is None
    breaker.set_open(True, 100.0)  # an operator still can
    assert breaker.is_open


# ---- a real router ----


async def test_a_destination_failing_for_a_while_is_only_probed_until_it_recovers(
    world: World,
) -> None:
    """Every attempt fails: the circuit opens (recorded on the destination, shown by admin and
    RouterStatus), nothing is aborted although the retry policy would have given up long
    ago, the receiver gets one probe a second; once it answers again the circuit closes and
    every user's events arrive in order."""
    # The retry policy gives up after 2 attempts once 3 s have passed since the first: the
    # circuit opens before that, and then nothing is given up on.
    await world.destination("hook", max_attempts=2, max_retry_window_s=3, circuit_after_s=1,
                            circuit_min_failures=3, circuit_probe_s=1)
    down = True
    world.webhook.answer = lambda _: Answer(503) if down else OK
    events = [event(f"m{i}", f"user-{i % 4}") for i in range(12)]
    async with ingest(world.database) as service, router(world.database) as relay, \
            admin(world.database) as adm:
        ids = await send(service, world.source, events)

        async def circuit() -> admin_pb2.Circuit:
            answer = await adm.stub.GetDestination(admin_pb2.GetDestinationRequest(id="hook"),
                                                   metadata=Admin.auth())
            return answer.circuit

        async def is_open() -> bool:
            return (await circuit()).open

        await eventually(is_open, within=20, what="the circuit opening")
        opened = await circuit()
        assert "every attempt failed" in opened.reason
        status = await relay.status.GetStatus(router_pb2.GetStatusRequest(),
                                              metadata=Admin.auth(), timeout=5)
        assert [d.circuit_open for d in status.destinations] == [True]
        # While open: a probe a second, nothing more (a rate, so watched over a while).
        before = len(world.webhook.received)
        await asyncio.sleep(3.2)
        assert len(world.webhook.received) - before <= 4
        assert "aborted" not in set((await states(world.conn)).values())
        down = False
        await wait_until_finished(world.conn, len(ids), within=30)
        async def is_closed() -> bool:
            return not (await circuit()).open

        await eventually(is_closed, within=10, what="the circuit closing")
    assert set((await states(world.conn)).values()) == {"succeeded"}
    by_user: dict[str, list[int]] = defaultdict(list)
    for delivery in world.webhook.oks:
        by_user[delivery.user_id].append(delivery.job_id)
    expected: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(events, ids, strict=True):
        expected[e.user_id].append(job_id)
    assert dict(by_user) == dict(expected)


async def test_an_operator_opens_and_closes_a_circuit_by_hand(world: World) -> None:
    await world.destination("hook", circuit_probe_s=3)
    world.webhook.answer = lambda _: Answer(503)
    async with ingest(world.database) as service, router(world.database) as relay, \
            admin(world.database) as adm:
        opened = await adm.stub.SetCircuit(admin_pb2.SetCircuitRequest(
            destination_id="hook", open=True, reason="their maintenance window"),
            metadata=Admin.auth())
        assert opened.circuit.open
        assert opened.circuit.reason == "their maintenance window (admin:operator)"
        # The router hears of it (a configuration NOTIFY) before the jobs come.
        engine = relay.app.engine
        assert engine is not None
        await eventually(lambda: any(d.circuit_opened_at is not None
                                     for d in engine.destinations.values()),
                         what="the router seeing the open circuit")
        ids = await send(service, world.source, [event(f"m{i}", "alice") for i in range(5)])
        await world.webhook.wait_for(lambda: len(world.webhook.received) >= 1, within=10)
        await asyncio.sleep(1.0)  # an absence, watched for a while
        assert len(world.webhook.received) == 1  # one probe, the next 3 s away
        world.webhook.answer = lambda _: OK
        closed = await adm.stub.SetCircuit(admin_pb2.SetCircuitRequest(
            destination_id="hook", open=False), metadata=Admin.auth())
        assert not closed.circuit.open
        await wait_until_finished(world.conn, len(ids), within=20)
    assert [d.job_id for d in world.webhook.oks] == ids


async def test_opening_a_circuit_needs_a_reason(world: World) -> None:
    await world.destination("hook")
    async with admin(world.database) as adm:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await adm.stub.SetCircuit(admin_pb2.SetCircuitRequest(destination_id="hook",
                                                                  open=True),
                                      metadata=Admin.auth())
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reason: required" in (refused.value.details() or "")
        cur = await world.conn.execute("SELECT circuit_opened_at FROM destinations")
        assert await cur.fetchone() == (None,)
