"""The delivery queue's SQL: pickup order, the ordering barrier, parking, releasing, recording."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection

from jobsdb import leases, queue
from jobsdb.ingest import NewEvent, store_events
from jobsdb.queue import Outcome
from tests import factories
from tests.helpers import NOW, outcome
from tests.poll import eventually


async def _dest(conn: AsyncConnection[Any]) -> dict[str, int]:
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    d1 = await factories.destination(conn, tenant, "d1")
    await factories.connect(conn, source.key, d1)
    return {"tenant": tenant, "source": source.key, "d1": d1}


@pytest.fixture
async def dest(tx: AsyncConnection[Any]) -> dict[str, int]:
    """A destination in the test's rolled-back transaction (most tests here need no other
    session to see their rows)."""
    return await _dest(tx)


@pytest.fixture
async def committed_dest(conn: AsyncConnection[Any]) -> dict[str, int]:
    """A destination committed, for tests that race a second session."""
    return await _dest(conn)


async def add(conn: AsyncConnection[Any], dest: dict[str, int], *users: str) -> list[int]:
    """One job per user name given, in order, each with a pending row (the row path, which
    these tests are about: a released waiter's, an operator's retry); returns the job ids."""
    cur = await conn.execute("SELECT count(*) FROM jobs")
    offset = (await cur.fetchone() or [0])[0]
    events = [
        NewEvent(dest["source"], dest["tenant"], f"m{offset + i}", user,
                 f'{{"i": {offset + i}}}', (dest["d1"],))
        for i, user in enumerate(users)
    ]
    async with conn.transaction():
        stored = await store_events(conn, events, ordering_partitions=64)
        return await factories.pending_rows(conn, [s.event_id for s in stored if s.event_id])


async def states(conn: AsyncConnection[Any]) -> dict[int, tuple[str, int | None]]:
    cur = await conn.execute("SELECT job_id, state::text, blocked_by FROM jobs")
    return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}


async def test_pickup_reads_runnable_jobs_in_job_order(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    a1, b1, a2, c1 = await add(tx, dest, "a", "b", "a", "c")
    got = await queue.pickup(tx, destination_key=dest["d1"], limit=10)
    assert [c.job_id for c in got] == [a1, b1, a2, c1]
    assert all(c.held_by is None for c in got)
    assert got[0].payload == '{"i": 0}'
    assert [c.job_id for c in await queue.pickup(
        tx, destination_key=dest["d1"], limit=2, exclude=[a1])] == [b1, a2]


async def test_failed_jobs_are_read_when_due_and_hold_their_user_meanwhile(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    a1, b1, a2 = await add(tx, dest, "a", "b", "a")
    # From now, not from the module's import: a slow suite can take more than five minutes.
    later = datetime.now(UTC) + timedelta(minutes=5)
    await queue.record_outcomes(tx, [outcome(a1, "failed", retry_at=later)], actor="test")
    got = await queue.pickup(tx, destination_key=dest["d1"], limit=10)
    # a1 is backing off: not read. a2 comes after it and is held by it; b1 flows.
    assert [(c.job_id, c.held_by) for c in got] == [(b1, None), (a2, a1)]

    await tx.execute("UPDATE jobs SET retry_at = now() - interval '1 second' WHERE job_id = %s",
                       (a1,))
    got = await queue.pickup(tx, destination_key=dest["d1"], limit=10)
    assert [(c.job_id, c.state, c.held_by) for c in got] == [
        (a1, "failed", None), (b1, "pending", None), (a2, "pending", a1)]


async def test_parked_jobs_leave_the_queue_until_their_blocker_ends(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    a1, a2, a3 = await add(tx, dest, "a", "a", "a")
    await queue.record_outcomes(tx, [outcome(a1, "failed", retry_at=NOW + timedelta(hours=1))],
                                actor="test")
    assert await queue.hold(tx, [(a2, a1), (a3, a1)]) == {a2, a3}
    assert await queue.pickup(tx, destination_key=dest["d1"], limit=10) == []
    # A later job of the same user is held by the root, through the waiting ones.
    (a4,) = await add(tx, dest, "a")
    (got,) = await queue.pickup(tx, destination_key=dest["d1"], limit=10)
    assert (got.job_id, got.held_by) == (a4, a1)

    recorded = await queue.record_outcomes(tx, [outcome(a1, "succeeded", attempt=2)],
                                           actor="test")
    assert recorded.moved == {a1}
    assert recorded.released == 2
    got = await queue.pickup(tx, destination_key=dest["d1"], limit=10)
    assert [(c.job_id, c.held_by) for c in got] == [(a2, None), (a3, None), (a4, None)]


async def test_an_aborted_job_releases_its_barrier(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    a1, a2 = await add(tx, dest, "a", "a")
    await queue.record_outcomes(tx, [outcome(a1, "failed", retry_at=NOW)], actor="test")
    await queue.hold(tx, [(a2, a1)])
    await queue.record_outcomes(
        tx, [outcome(a1, "aborted", attempt=2, error_code="404", reason="not found")],
        actor="router:r1")
    assert (await states(tx))[a2] == ("pending", None)
    cur = await tx.execute(
        "SELECT attempt, state::text, error_code, reason, actor FROM job_statuses"
        " WHERE job_id = %s ORDER BY attempt", (a1,))
    assert await cur.fetchall() == [
        (1, "failed", None, None, "test"), (2, "aborted", "404", "not found", "router:r1")]


async def test_an_outcome_does_not_undo_an_operators_abort(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    (a1,) = await add(tx, dest, "a")
    await tx.execute("UPDATE jobs SET state = 'aborted' WHERE job_id = %s", (a1,))
    recorded = await queue.record_outcomes(tx, [outcome(a1, "succeeded")], actor="test")
    assert recorded.moved == frozenset()
    assert (await states(tx))[a1] == ("aborted", None)
    cur = await tx.execute("SELECT count(*) FROM job_statuses WHERE job_id = %s", (a1,))
    assert (await cur.fetchone() or [0])[0] == 1  # the attempt happened; it is on record


async def test_nothing_is_parked_behind_a_blocker_that_already_ended(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    a1, a2 = await add(tx, dest, "a", "a")
    await tx.execute("UPDATE jobs SET state = 'aborted' WHERE job_id = %s", (a1,))
    assert await queue.hold(tx, [(a2, a1)]) == set()
    assert (await states(tx))[a2] == ("pending", None)


async def test_parking_racing_an_operators_abort_never_strands_a_job(
    database: str, conn: AsyncConnection[Any], committed_dest: dict[str, int]
) -> None:
    """The router parks a2 behind a1 while an operator aborts a1: a2 must end up runnable."""
    a1, a2 = await add(conn, committed_dest, "a", "a")
    await queue.record_outcomes(conn, [outcome(a1, "failed", retry_at=NOW)], actor="test")
    async with await AsyncConnection.connect(database) as router, \
            await AsyncConnection.connect(database) as operator:
        await queue.hold(router, [(a2, a1)])  # parked, not yet committed

        async def abort() -> None:
            await operator.execute(
                "UPDATE jobs SET state = 'aborted' WHERE job_id = %s", (a1,))
            await queue.release(operator, [a1])
            await operator.commit()

        aborting = asyncio.create_task(abort())
        await eventually(lambda: _waits_for_a_lock(conn, operator.info.backend_pid),
                         within=10, every=0.02, what="the abort waiting for a lock")
        assert not aborting.done()  # the abort waits for the parking transaction
        await router.commit()
        await aborting
    assert (await states(conn))[a2] == ("pending", None)


async def _waits_for_a_lock(conn: AsyncConnection[Any], pid: int) -> bool:
    cur = await conn.execute(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,))
    return await cur.fetchone() == (True,)


async def test_orphaned_waiting_jobs_are_released(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    a1, a2 = await add(tx, dest, "a", "a")
    await tx.execute(
        "UPDATE jobs SET state = 'waiting', blocked_by = %s WHERE job_id = %s", (a1, a2))
    assert await queue.release_orphans(tx) == set()  # a1 is pending: a2 rightly waits
    await tx.execute("UPDATE jobs SET state = 'succeeded' WHERE job_id = %s", (a1,))
    assert await queue.release_orphans(tx) == {a2}
    # A blocker that is gone altogether (its partition dropped or compacted) had finished.
    await tx.execute(
        "UPDATE jobs SET state = 'waiting', blocked_by = 999999 WHERE job_id = %s", (a2,))
    assert await queue.release_orphans(tx) == {a2}


async def test_long_responses_are_cut_before_they_are_stored(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    (a1,) = await add(tx, dest, "a")
    await queue.record_outcomes(
        tx, [outcome(a1, "failed", retry_at=NOW, response="x" * 50_000)], actor="test")
    cur = await tx.execute("SELECT length(response) FROM job_statuses")
    assert (await cur.fetchone() or [0])[0] < 10_100


@pytest.mark.parametrize("seed", range(6))
async def test_a_reference_router_keeps_every_users_order_under_random_failures(
    tx: AsyncConnection[Any], dest: dict[str, int], seed: int
) -> None:
    """Drive the queue the way a router does, with random outcomes, and check what a sink saw.

    Each user's delivered sequence must be their jobs in job order, minus aborted ones, each
    delivered once it succeeded; every job ends succeeded or aborted.
    """
    rng = random.Random(seed)
    users = [f"u{i}" for i in range(8)]
    ids = await add(tx, dest, *(rng.choice(users) for _ in range(120)))
    user_of = dict(zip(ids, (await _users(tx, ids)), strict=True))
    delivered: dict[str, list[int]] = {u: [] for u in users}
    attempts: dict[int, int] = {}

    for _ in range(500):
        batch = await queue.pickup(tx, destination_key=dest["d1"], limit=rng.randint(1, 15))
        if not batch:
            cur = await tx.execute("SELECT count(*) FROM jobs WHERE state = 'failed'")
            if not (await cur.fetchone() or [0])[0]:
                break
            await tx.execute("UPDATE jobs SET retry_at = now() WHERE state = 'failed'")
            continue
        in_batch = {c.job_id for c in batch}
        blocked_users: set[str] = set()
        outcomes: list[Outcome] = []
        park: list[tuple[int, int]] = []
        for c in batch:
            if c.held_by is not None and c.held_by not in in_batch:
                park.append((c.job_id, c.held_by))
                continue
            if c.held_by is not None or c.user_id in blocked_users:
                continue  # behind an earlier job of this batch that did not succeed
            attempts[c.job_id] = c.attempts + 1
            roll = rng.random()
            if roll < 0.6:
                delivered[c.user_id].append(c.job_id)
                outcomes.append(outcome(c.job_id, "succeeded", c.attempts + 1))
            elif roll < 0.9:
                blocked_users.add(c.user_id)
                outcomes.append(outcome(c.job_id, "failed", c.attempts + 1,
                                        retry_at=NOW - timedelta(seconds=1)))
            else:
                outcomes.append(outcome(c.job_id, "aborted", c.attempts + 1))
        async with tx.transaction():
            await queue.record_outcomes(tx, outcomes, actor="test")
            await queue.hold(tx, park)

    final = await states(tx)
    assert {s for s, _ in final.values()} <= {"succeeded", "aborted"}
    for user in users:
        theirs = [j for j in ids if user_of[j] == user and final[j][0] == "succeeded"]
        assert delivered[user] == theirs, user


async def _users(conn: AsyncConnection[Any], ids: list[int]) -> list[str]:
    cur = await conn.execute(
        "SELECT user_id FROM jobs WHERE job_id = ANY(%s) ORDER BY job_id", (ids,))
    return [r[0] for r in await cur.fetchall()]


# --- fencing: what a router whose lease another took writes changes nothing --------------

async def _lease(conn: AsyncConnection[Any], job_id: int, owner: str, *,
                 expires_in: str = "1 hour") -> None:
    await conn.execute(
        "UPDATE router_leases SET owner = %s, expires_at = now() + %s::interval"
        " WHERE partition = (SELECT ordering_partition FROM jobs WHERE job_id = %s)",
        (owner, expires_in, job_id))


async def _job_row(conn: AsyncConnection[Any], job_id: int) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT state::text, attempts, blocked_by FROM jobs WHERE job_id = %s", (job_id,))
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


async def test_outcomes_and_parkings_move_jobs_only_under_the_writers_own_lease(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    """Fenced by the lease's owner, not its expiry: a lease that ran out while nobody took
    it (Postgres unreachable for longer than the lease) is still the writer's."""
    a1, a2 = await add(tx, dest, "a", "a")
    await _lease(tx, a1, "b")  # router b took the partition over
    recorded = await queue.record_outcomes(tx, [outcome(a1, "succeeded")], actor="router:a",
                                           owner="a")
    assert recorded.moved == frozenset()
    assert await queue.hold(tx, [(a2, a1)], owner="a") == set()
    assert await _job_row(tx, a1) == ("pending", 0, None)
    assert await _job_row(tx, a2) == ("pending", 0, None)
    # Every attempt is on record all the same: it happened.
    cur = await tx.execute("SELECT count(*) FROM job_statuses WHERE job_id = %s", (a1,))
    assert await cur.fetchone() == (1,)
    await _lease(tx, a1, "a", expires_in="-1 second")  # a's own lease, run out, not taken
    recorded = await queue.record_outcomes(
        tx, [outcome(a1, "failed", retry_at=NOW + timedelta(hours=1))], actor="router:a",
        owner="a")
    assert recorded.moved == {a1}
    assert await queue.hold(tx, [(a2, a1)], owner="a") == {a2}
    assert await _job_row(tx, a2) == ("waiting", 0, a1)


async def test_an_attempt_older_than_the_recorded_one_moves_nothing(
    tx: AsyncConnection[Any], dest: dict[str, int]
) -> None:
    """A late write (or one retried after its commit did happen) cannot set the attempt
    count back, which would reset max_attempts, nor count a delivery twice."""
    (a1,) = await add(tx, dest, "a")
    later = NOW + timedelta(hours=1)
    await queue.record_outcomes(tx, [outcome(a1, "failed", attempt=5, retry_at=later)],
                                actor="test")
    recorded = await queue.record_outcomes(
        tx, [outcome(a1, "failed", attempt=1, retry_at=NOW)], actor="test")
    assert recorded.moved == frozenset()
    assert await _job_row(tx, a1) == ("failed", 5, None)
    again = await queue.record_outcomes(
        tx, [outcome(a1, "failed", attempt=5, retry_at=later)], actor="test")
    assert again.moved == frozenset()
    cur = await tx.execute("SELECT sum(failed) FROM delivery_counts")
    assert await cur.fetchone() == (1,)


async def test_a_fenced_write_keeps_its_leases_from_other_routers_not_from_its_own(
    database: str, conn: AsyncConnection[Any], committed_dest: dict[str, int]
) -> None:
    """Until an outcome write commits, no other router can take the lease it was checked
    against (else that router could read the job before the write and send it again); the
    writer's own renewals must not wait for it, or overlapping flushes could starve them."""
    (a1,) = await add(conn, committed_dest, "a")
    await _lease(conn, a1, "a")
    cur = await conn.execute("SELECT ordering_partition FROM jobs WHERE job_id = %s", (a1,))
    partition = (await cur.fetchone() or [0])[0]
    async with await AsyncConnection.connect(database) as writer, \
            await AsyncConnection.connect(database, autocommit=True) as other:
        await queue.record_outcomes(writer, [outcome(a1, "succeeded")], actor="router:a",
                                    owner="a")  # not yet committed
        await other.execute("SET lock_timeout = '2s'")
        assert partition in await leases.renew(other, "a", timedelta(seconds=-1))  # ran out
        assert partition not in await leases.acquire(other, "b", timedelta(minutes=1), 64)
        await writer.commit()
        assert partition in await leases.acquire(other, "b", timedelta(minutes=1), 64)
    assert await _job_row(conn, a1) == ("succeeded", 1, None)
