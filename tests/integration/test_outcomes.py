"""Recording outcomes: the statement's two ways in (successes as text, the rest as arrays) and
the router's flusher that feeds it in capped, overlapping transactions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection

from jobsdb import keyspace, leases, queue
from jobsdb.ingest import NewEvent, store_events
from jobsdb.pool import open_pool
from jobsdb.queue import Outcome
from router_service.model import Job
from router_service.outcomes import OutcomeFlusher
from tests import factories
from tests.helpers import event
from tests.pipeline import World, deliver_under_random_failures, send, states, wait_until_finished
from tests.services import ingest, router
from tests.sinks import OK, Answer

# Microseconds that a float of epoch seconds would round wrongly if they were ever computed
# through one (0.1 and 0.7 have no exact binary form).
STARTED = datetime(2026, 11, 25, 13, 49, 16, 100_001, tzinfo=UTC)


@pytest.fixture
async def jobs(conn: AsyncConnection[Any]) -> list[int]:
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    d1 = await factories.destination(conn, tenant, "d1")
    d2 = await factories.destination(conn, tenant, "d2")
    for key in (d1, d2):
        await factories.connect(conn, source.key, key)
    events = [NewEvent(source.key, tenant, f"m{i}", f"u{i}", "{}", (d1 if i % 2 else d2,))
              for i in range(40)]
    async with conn.transaction():
        stored = await store_events(conn, events, ordering_partitions=64)
        # With rows: record_outcomes is the row path's (retries, released waiters).
        return await factories.pending_rows(conn, [s.event_id for s in stored if s.event_id])


async def test_successes_and_failures_in_one_batch_are_all_recorded_exactly(
    conn: AsyncConnection[Any], jobs: list[int]
) -> None:
    ok1, failed, aborted, ok2, with_response = jobs[:5]
    retry_at = STARTED + timedelta(seconds=30)
    outcomes = [
        Outcome(ok1, 1, "succeeded", STARTED, 12),
        Outcome(failed, 1, "failed", STARTED + timedelta(microseconds=700_000), 5, "500",
                "oops", retry_at),
        Outcome(aborted, 1, "aborted", STARTED, 7, "400", "bad", None, "not retryable: 400"),
        Outcome(ok2, 3, "succeeded", STARTED + timedelta(microseconds=1), 0),
        # A success that carries a response goes the general way, response and all.
        Outcome(with_response, 1, "succeeded", STARTED, 4, None, "fine"),
    ]
    async with conn.transaction():
        recorded = await queue.record_outcomes(conn, outcomes, actor="router:t")
    assert recorded.moved == {ok1, failed, aborted, ok2, with_response}
    cur = await conn.execute(
        "SELECT job_id, attempt, state::text, error_code, response, started_at, duration_ms,"
        " retry_at, actor, reason FROM job_statuses ORDER BY job_id")
    assert await cur.fetchall() == [
        (ok1, 1, "succeeded", None, None, STARTED, 12, None, "router:t", None),
        (failed, 1, "failed", "500", "oops", STARTED + timedelta(microseconds=700_000), 5,
         retry_at, "router:t", None),
        (aborted, 1, "aborted", "400", "bad", STARTED, 7, None, "router:t",
         "not retryable: 400"),
        (ok2, 3, "succeeded", None, None, STARTED + timedelta(microseconds=1), 0, None,
         "router:t", None),
        (with_response, 1, "succeeded", None, "fine", STARTED, 4, None, "router:t", None),
    ]
    cur = await conn.execute(
        "SELECT job_id, state::text, attempts, first_attempt_at, retry_at FROM jobs"
        " WHERE job_id = ANY(%s) ORDER BY job_id", ([ok1, failed, ok2],))
    assert await cur.fetchall() == [
        (ok1, "succeeded", 1, STARTED, None),
        (failed, "failed", 1, STARTED + timedelta(microseconds=700_000), retry_at),
        (ok2, "succeeded", 3, STARTED + timedelta(microseconds=1), None),
    ]
    cur = await conn.execute(
        "SELECT sum(succeeded), sum(failed), sum(aborted) FROM delivery_counts")
    assert await cur.fetchone() == (3, 1, 1)


async def test_a_success_for_a_job_finished_meanwhile_is_logged_but_moves_nothing(
    conn: AsyncConnection[Any], jobs: list[int]
) -> None:
    await conn.execute("UPDATE jobs SET state = 'aborted' WHERE job_id = %s", (jobs[0],))
    async with conn.transaction():
        recorded = await queue.record_outcomes(
            conn, [Outcome(jobs[0], 1, "succeeded", STARTED, 1),
                   Outcome(jobs[1], 1, "succeeded", STARTED, 1)], actor="router:t")
    assert recorded.moved == {jobs[1]}
    cur = await conn.execute("SELECT count(*) FROM job_statuses")
    assert await cur.fetchone() == (2,)
    cur = await conn.execute("SELECT state::text FROM jobs WHERE job_id = %s", (jobs[0],))
    assert await cur.fetchone() == ("aborted",)


async def test_successes_release_the_jobs_parked_behind_them(
    conn: AsyncConnection[Any], jobs: list[int]
) -> None:
    blocker, waiter, other = jobs[:3]
    async with conn.transaction():
        assert await queue.hold(conn, [(waiter, blocker), (other, blocker)]) == {waiter, other}
    # Many times, so that a prepared statement's generic plan would be in use by now.
    for job_id in jobs[3:10]:
        async with conn.transaction():
            await queue.record_outcomes(conn, [Outcome(job_id, 1, "succeeded", STARTED, 1)],
                                        actor="router:t")
    async with conn.transaction():
        recorded = await queue.record_outcomes(
            conn, [Outcome(blocker, 1, "succeeded", STARTED, 1)], actor="router:t")
    assert recorded.released == 2
    cur = await conn.execute("SELECT state::text, blocked_by FROM jobs WHERE job_id = ANY(%s)",
                             ([waiter, other],))
    assert await cur.fetchall() == [("pending", None), ("pending", None)]


class _Lane:
    """What the flusher calls back on a lane."""

    destination_key = 1

    def __init__(self) -> None:
        self.recorded_ids: list[int] = []
        self.notified = 0

    def recorded(self, decided: list[Job], undecided: list[Job]) -> None:
        self.recorded_ids.extend(j.job_id for j in [*decided, *undecided])

    def notify(self) -> None:
        self.notified += 1


def _job(job_id: int) -> Job:
    return Job(job_id, "u", "m", 1, "{}", STARTED, None, 0)


async def test_a_backlog_is_flushed_in_capped_transactions_and_drains_completely(
    database: str, conn: AsyncConnection[Any], jobs: list[int]
) -> None:
    # Writes are fenced by lease: router "t" holds every partition.
    await conn.execute("UPDATE router_leases SET owner = 't', expires_at = now() + interval '1h'")
    pool = await open_pool(database, application_name="test-outcomes", max_size=4)
    try:
        flusher = OutcomeFlusher(pool, "t", delay=0.001, max_batch=7, concurrency=2)
        flusher.start()
        lane: Any = _Lane()
        blocker, *rest = jobs
        for job_id in rest[:30]:
            flusher.add(lane, _job(job_id), Outcome(job_id, 1, "succeeded", STARTED, 1))
        # A failure written with the jobs parked behind it travels in one transaction.
        flusher.add(lane, _job(blocker), Outcome(blocker, 1, "failed", STARTED, 1, "500", None,
                                                 STARTED + timedelta(hours=1)),
                    park=[(_job(j), blocker) for j in rest[30:39]])
        await asyncio.wait_for(flusher.drain(), 30)
        await flusher.close()
    finally:
        await pool.close()
    assert sorted(lane.recorded_ids) == sorted(jobs)
    # xmin is the writing transaction (recorded_at, its start, can tie between transactions).
    cur = await conn.execute("SELECT count(*) FROM job_statuses GROUP BY xmin")
    sizes = [r[0] for r in await cur.fetchall()]
    assert sum(sizes) == 31
    assert len(sizes) >= 5
    cur = await conn.execute(
        "SELECT count(*) FROM jobs WHERE state = 'waiting' AND blocked_by = %s", (blocker,))
    assert await cur.fetchone() == (9,)
    cur = await conn.execute(
        "SELECT count(*) FROM job_statuses s JOIN job_statuses b ON s.xmin = b.xmin"
        " WHERE b.job_id = %s", (blocker,))
    # The failure and its nine parkings, more than the cap together, went as one transaction
    # of their own: no other attempt shares the failure's.
    assert await cur.fetchone() == (1,)


@pytest.mark.parametrize("seed", [4, 5])
async def test_order_holds_under_failures_with_tiny_flushes_in_flight_together(
    world: World, seed: int
) -> None:
    """The router end to end with flushes of at most 3 items, 4 in flight: failures, the
    parkings behind them and successes spread over many overlapping transactions, and still
    every user's accepted jobs arrive in order, every attempt is on record exactly once, and
    nothing stays waiting."""
    await world.destination("d", kind="grpc", max_attempts=4, max_retry_window_s=0)
    await deliver_under_random_failures(
        world, world.grpc_sink, seed, users=15, events=200,
        RELAYQ_ROUTER_FLUSH_MAX="3", RELAYQ_ROUTER_FLUSH_CONCURRENCY="4")
    # One transaction per flush (xmin, not recorded_at: two flushes can start in one µs).
    cur = await world.conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM job_statuses"
                                   " GROUP BY xmin) t")
    assert (await cur.fetchone() or [0])[0] <= 3
    cur = await world.conn.execute("SELECT count(*) FROM job_statuses WHERE state = 'failed'")
    assert (await cur.fetchone() or [0])[0] > 20  # retries (and parkings behind them) happened


async def test_an_answer_postgres_refuses_is_recorded_with_a_safe_text_and_the_rest_flow(
    world: World,
) -> None:
    """A write Postgres refuses for what it holds fails the same way on every retry: it must
    not stall every outcome behind it. Here a constraint refuses one destination answer."""
    await world.conn.execute(
        "ALTER TABLE job_statuses ADD CONSTRAINT no_poison"
        " CHECK (response IS NULL OR response NOT LIKE '%poison%')")
    await world.destination("hook")
    world.webhook.answer = lambda d: (Answer(500, body="poison") if d.message_id == "m7"
                                      and d.attempt == 1 else OK)
    events = [event(f"m{i}", f"user-{i % 5}") for i in range(30)]
    async with ingest(world.database) as service, router(world.database):
        ids = await send(service, world.source, events)
        await wait_until_finished(world.conn, len(ids), within=30)
    cur = await world.conn.execute(
        "SELECT s.attempt, s.state::text, s.error_code, s.response FROM job_statuses s"
        " JOIN jobs j USING (job_id) WHERE j.message_id = 'm7' ORDER BY s.attempt")
    (first, second) = await cur.fetchall()
    assert first[:3] == (1, "failed", "500")
    assert first[3].startswith("[not storable: ConstraintViolation")
    assert second[:2] == (2, "succeeded")
    assert set((await states(world.conn)).values()) == {"succeeded"}


async def test_an_outcome_refused_even_with_safe_texts_holds_only_its_own_job(
    world: World,
) -> None:
    """Nothing about it can be written: its job keeps its state in Postgres and stays held by
    the router (not sent again in a loop); every other job is recorded."""
    await world.destination("hook")
    events = [event("lonely", "user-x")] + [event(f"m{i}", f"user-{i % 5}") for i in range(20)]
    async with ingest(world.database) as service:
        ids = await send(service, world.source, events)
    # Its delivery is refused whatever the text (a success from the log is recorded as a
    # deliveries row, of which this one can never be part).
    await world.conn.execute("ALTER TABLE deliveries ADD CONSTRAINT refused"
                             f" CHECK (NOT {ids[0] >> 16} = ANY(event_ids))")
    async with router(world.database):
        await wait_until_finished(world.conn, len(ids) - 1, within=30)
        # An absence: give the router several polls (0.5 s each) to send it again if it would.
        await asyncio.sleep(1.5)
    assert [d.message_id for d in world.webhook.received].count("lonely") == 1
    final = await states(world.conn)
    assert final.pop(ids[0]) == "pending"
    assert set(final.values()) == {"succeeded"}


class _SplitLane(_Lane):
    def __init__(self) -> None:
        super().__init__()
        self.decided: list[int] = []
        self.undecided: list[int] = []

    def recorded(self, decided: list[Job], undecided: list[Job]) -> None:
        self.decided += [j.job_id for j in decided]
        self.undecided += [j.job_id for j in undecided]


async def test_outcomes_of_a_partition_another_router_took_are_not_taken_as_recorded(
    database: str, conn: AsyncConnection[Any]
) -> None:
    """Every write is fenced by the lease's owner. A partition whose lease ran out while
    nobody took it (Postgres was unreachable for longer than the lease) is still this
    router's: what it delivered is recorded, not delivered again. Nothing of a partition
    another router took is recorded: the flusher must say so (undecided: read again), not that
    it was recorded, or
    the router's cursors would move past deliveries and failures that are not on record (the
    chaos soak's missing events, issue 16)."""
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    destination = await factories.destination(conn, tenant, "d1")
    await factories.connect(conn, source.key, destination)
    events = [NewEvent(source.key, tenant, f"m{i}", f"user-{i}", "{}", None) for i in range(60)]
    async with conn.transaction():
        stored = await store_events(conn, events, ordering_partitions=64)
    cur = await conn.execute("SELECT event_id, ordering_partition, user_id FROM events")
    logged = {int(e): (int(p), u) for e, p, u in await cur.fetchall()}
    by_partition: dict[int, list[int]] = {}
    for event_id, (partition, _) in sorted(logged.items()):
        by_partition.setdefault(partition, []).append(event_id)
    kept, *ran_out = sorted(by_partition, key=lambda p: -len(by_partition[p]))[:3]
    await conn.execute("UPDATE router_leases SET owner = 't', expires_at = now() + interval '1h'")
    await conn.execute("UPDATE router_leases SET expires_at = now() - interval '1s'"
                       " WHERE partition = ANY(%s)", (ran_out,))
    # Of the two whose lease ran out, another router takes one; the other is still t's.
    (taken,) = await leases.acquire(conn, "other", timedelta(minutes=1), 1)
    (lapsed,) = set(ran_out) - {taken}
    assert stored

    def job(event_id: int) -> Job:
        partition, user = logged[event_id]
        return Job(keyspace.job_id(event_id, 1), user, f"m{event_id}", 1, "{}", STARTED, None,
                   partition, logged=True, event_id=event_id, source_key=source.key,
                   tenant_key=tenant)

    pool = await open_pool(database, application_name="test-outcomes", max_size=2)
    lane: Any = _SplitLane()
    lane.destination_key = destination
    try:
        flusher = OutcomeFlusher(pool, "t", delay=0.001, max_batch=100)
        flusher.start()
        for partition in (kept, lapsed, taken):
            ok, failed = by_partition[partition][:2]
            flusher.add(lane, job(ok), Outcome(keyspace.job_id(ok, 1), 1, "succeeded",
                                               STARTED, 1))
            flusher.add(lane, job(failed), Outcome(
                keyspace.job_id(failed, 1), 1, "failed", STARTED, 1, "503", None,
                STARTED + timedelta(minutes=1)))
        await asyncio.wait_for(flusher.drain(), 30)
        await flusher.close()
    finally:
        await pool.close()
    mine = {keyspace.job_id(e, 1) for p in (kept, lapsed) for e in by_partition[p][:2]}
    taken_jobs = {keyspace.job_id(e, 1) for e in by_partition[taken][:2]}
    assert set(lane.decided) == mine
    assert set(lane.undecided) == taken_jobs
    cur = await conn.execute("SELECT job_id FROM jobs")
    assert {r[0] for r in await cur.fetchall()} == {
        keyspace.job_id(by_partition[p][1], 1) for p in (kept, lapsed)}
    cur = await conn.execute("SELECT unnest(event_ids) FROM deliveries")
    assert {r[0] for r in await cur.fetchall()} == {by_partition[p][0] for p in (kept, lapsed)}
