"""relayq-admin jobs RPCs with real routers and sinks: list, get, peek, retry, abort, stats."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import psycopg
import pytest

from relayq.v1 import admin_pb2, common_pb2
from tests.helpers import event
from tests.pipeline import World, router_sees, send, states, wait_until_finished
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router
from tests.sinks import OK, Answer, Received

AUTH = Admin.auth()
SLOW_RETRIES = {"min_backoff_ms": 600_000, "max_backoff_ms": 600_000}


def fail_first(message_ids: set[str], status: int = 503) -> Any:
    """Answer `status` to the first attempt of these messages, OK to everything else."""

    def answer(delivery: Received) -> Answer:
        if delivery.message_id in message_ids and delivery.attempt == 1:
            return Answer(status, body="not now")
        return OK

    return answer


async def _wait_state(world: World, job_id: int, state: str) -> None:
    async def reached() -> bool:
        return (await states(world.conn)).get(job_id) == state

    async def seen() -> str:
        return f"job {job_id} becoming {state} ({await states(world.conn)})"

    await eventually(reached, within=10, every=0.05, what=seen)


async def test_list_jobs_pages_by_filter_stay_stable_while_jobs_arrive(world: World) -> None:
    await world.destination("d1", paused=True)
    await world.destination("d2", paused=True)
    async with ingest(world.database) as service, admin(world.database) as adm:
        ids = await send(service, world.source, [event(f"m{i}", f"u{i % 3}", n=i)
                                                     for i in range(10)])
        d1 = ids[0::2]  # fan-out: each event gives a d1 job then a d2 job
        seen: list[int] = []
        token = ""
        pages = 0
        while True:
            page = await adm.stub.ListJobs(admin_pb2.ListJobsRequest(
                filter="destination = 'd1'", page_size=3, page_token=token), metadata=AUTH)
            seen += [j.job_id for j in page.jobs]
            pages += 1
            if pages == 1:  # new jobs arriving between pages land after, never in between
                ids += await send(service, world.source,
                                  [event(f"n{i}", "u0") for i in range(4)])
            token = page.next_page_token
            if not token:
                break
        assert seen == d1 + ids[20::2]
        assert all(j.destination_id == "d1" for j in page.jobs)
        with_payload = await adm.stub.ListJobs(admin_pb2.ListJobsRequest(
            filter="payload.properties.n = 3 AND destination = 'd2'", include_payload=True),
            metadata=AUTH)
        assert [j.message_id for j in with_payload.jobs] == ["m3"]
        by_user = await adm.stub.ListJobs(admin_pb2.ListJobsRequest(
            filter="user_id = 'u1' AND destination = 'd2'", include_payload=True), metadata=AUTH)
        assert [j.message_id for j in by_user.jobs] == ["m1", "m4", "m7"]
        assert by_user.jobs[0].payload["event"] == "Order Completed"
        assert by_user.jobs[0].state == common_pb2.JOB_STATE_PENDING


@pytest.mark.parametrize(("text", "column"), [
    ("state = 'lost'", 9),
    ("attempts >= 'three'", 13),
    ("destination = ", 15),
    ("created_at > 'yesterday'", 14),
    ("(state = 'failed'", 18),
])
async def test_malformed_filters_are_invalid_argument_with_their_column(
        world: World, text: str, column: int) -> None:
    async with admin(world.database) as adm:
        for call in (
            adm.stub.ListJobs(admin_pb2.ListJobsRequest(filter=text), metadata=AUTH),
            adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
                selector=admin_pb2.JobSelector(filter=text)), metadata=AUTH),
            adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
                selector=admin_pb2.JobSelector(filter=text)), metadata=AUTH),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call
            assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"filter: column {column}: expected" in (failure.value.details() or "")


async def test_get_job_shows_the_payload_and_every_attempt(world: World) -> None:
    await world.destination("hook")
    world.webhook.answer = fail_first({"m1"})
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        [job_id] = await send(service, world.source, [event("m1", "alice", n=7)])
        await wait_until_finished(world.conn, 1)
        job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id), metadata=AUTH)
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED
    assert job.attempts == 2
    assert job.payload["properties"]["n"] == 7
    assert [(h.attempt, h.state, h.error_code) for h in job.history] == [
        (1, common_pb2.JOB_STATE_FAILED, "503"), (2, common_pb2.JOB_STATE_SUCCEEDED, "")]
    assert job.history[0].response == "not now"
    assert job.history[0].retry_at.seconds > 0
    assert job.history[0].actor.startswith("router:")


async def test_retry_of_a_failed_job_delivers_it_at_once(world: World) -> None:
    await world.destination("hook", **SLOW_RETRIES)
    world.webhook.answer = fail_first({"m1"})
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        [job_id] = await send(service, world.source, [event("m1", "alice")])
        await _wait_state(world, job_id, "failed")  # next try in ten minutes
        dry = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=admin_pb2.JobSelector(filter="state = 'failed'"), dry_run=True),
            metadata=AUTH)
        assert (dry.matched, dry.changed, dry.dry_run) == (1, 0, True)
        # Still failed and still ten minutes away: a retry would have made it due now.
        assert (await states(world.conn))[job_id] == "failed"
        cur = await world.conn.execute(
            "SELECT retry_at > now() + interval '5 minutes' FROM jobs WHERE job_id = %s",
            (job_id,))
        assert await cur.fetchone() == (True,)
        done = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=admin_pb2.JobSelector(job_ids=[job_id]), reason="fixed the sink"),
            metadata=AUTH)
        assert (done.matched, done.changed) == (1, 1)
        await _wait_state(world, job_id, "succeeded")
        job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id), metadata=AUTH)
    actions = [(h.actor, h.reason) for h in job.history if h.actor.startswith("admin:")]
    assert actions == [("admin:operator", "fixed the sink")]


async def test_abort_releases_the_users_later_jobs(world: World) -> None:
    await world.destination("hook", **SLOW_RETRIES)
    world.webhook.answer = fail_first({"m0"})
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        ids = await send(service, world.source, [event("m0", "alice")])
        await _wait_state(world, ids[0], "failed")
        ids += await send(service, world.source, [event(f"m{i}", "alice") for i in (1, 2)])
        await _wait_state(world, ids[2], "waiting")
        peek = await adm.stub.PeekJobs(admin_pb2.PeekJobsRequest(destination_id="hook"),
                                       metadata=AUTH)
        assert [(p.job.job_id, p.runnable, p.blocked_by) for p in peek.jobs] == [
            (ids[0], False, 0), (ids[1], False, ids[0]), (ids[2], False, ids[0])]
        assert peek.jobs[0].blocked_reason.startswith("retry at")
        assert peek.jobs[1].blocked_reason == f"waiting behind job {ids[0]}"
        aborted = await adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
            selector=admin_pb2.JobSelector(job_ids=[ids[0]]), reason="bad data"), metadata=AUTH)
        assert (aborted.matched, aborted.changed) == (1, 1)
        await wait_until_finished(world.conn, 3)
    assert [r.message_id for r in world.webhook.oks] == ["m1", "m2"]
    final = await states(world.conn)
    assert [final[i] for i in ids] == ["aborted", "succeeded", "succeeded"]


async def test_abort_by_filter_dry_run_counts_and_changes_nothing(world: World) -> None:
    await world.destination("hook", paused=True)
    async with ingest(world.database) as service, admin(world.database) as adm:
        ids = await send(service, world.source, [event(f"m{i}", f"u{i}") for i in range(6)])
        dry = await adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
            selector=admin_pb2.JobSelector(filter="user_id IN ('u1', 'u2')"), dry_run=True),
            metadata=AUTH)
        assert (dry.matched, dry.changed) == (2, 0)
        assert set((await states(world.conn)).values()) == {"pending"}
        done = await adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
            selector=admin_pb2.JobSelector(filter="user_id IN ('u1', 'u2')")), metadata=AUTH)
        assert (done.matched, done.changed) == (2, 2)
        again = await adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
            selector=admin_pb2.JobSelector(filter="user_id IN ('u1', 'u2')")), metadata=AUTH)
        assert (again.matched, again.changed) == (0, 0)
    final = await states(world.conn)
    assert [final[i] for i in ids] == ["pending", "aborted", "aborted", "pending", "pending",
                                       "pending"]


async def test_retrying_an_aborted_job_redelivers_it_before_its_users_later_jobs(
        world: World) -> None:
    await world.destination("hook", concurrency=4)
    async with ingest(world.database) as service, router(world.database) as running, \
            admin(world.database) as adm:
        await adm.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
            id="hook", paused=True), metadata=AUTH)
        await router_sees(running, "hook", paused=True)
        ids = await send(service, world.source, [event(f"m{i}", "alice") for i in range(4)])
        await adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
            selector=admin_pb2.JobSelector(job_ids=[ids[0]])), metadata=AUTH)
        retried = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=admin_pb2.JobSelector(filter="state = 'aborted'")), metadata=AUTH)
        assert retried.changed == 1
        await adm.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
            id="hook", paused=False), metadata=AUTH)
        await wait_until_finished(world.conn, 4)
    assert [r.message_id for r in world.webhook.oks] == ["m0", "m1", "m2", "m3"]


async def test_peek_order_is_the_order_the_router_delivers(world: World) -> None:
    await world.destination("hook", concurrency=1, min_backoff_ms=1500, max_backoff_ms=1500)
    world.webhook.answer = fail_first({"a0"})
    async with ingest(world.database) as service, router(world.database) as running, \
            admin(world.database) as adm:
        first = await send(service, world.source, [event("a0", "alice")])
        await _wait_state(world, first[0], "failed")
        await adm.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
            id="hook", paused=True), metadata=AUTH)
        await router_sees(running, "hook", paused=True)
        users = ["bob", "alice", "carol", "bob", "alice", "carol", "dave"]
        ids = first + await send(service, world.source, [
            event(f"{u[0]}{i + 1}", u) for i, u in enumerate(users)])
        peek = await adm.stub.PeekJobs(admin_pb2.PeekJobsRequest(destination_id="hook",
                                                                 limit=50), metadata=AUTH)
        assert [p.job.job_id for p in peek.jobs] == ids
        runnable = [p.job.message_id for p in peek.jobs if p.runnable]
        blocked = [p.job.message_id for p in peek.jobs if not p.runnable]
        assert all(p.blocked_reason == "destination paused" for p in peek.jobs if p.runnable
                   is False and p.blocked_by == 0 and p.job.user_id != "alice")
        # Paused, nothing is runnable; resumed, bob, carol and dave go in job order.
        await adm.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
            id="hook", paused=False), metadata=AUTH)
        resumed = await adm.stub.PeekJobs(admin_pb2.PeekJobsRequest(destination_id="hook"),
                                          metadata=AUTH)
        runnable = [p.job.message_id for p in resumed.jobs if p.runnable]
        del blocked
        await wait_until_finished(world.conn, len(ids))
    delivered = [r.message_id for r in world.webhook.oks]
    assert runnable == ["b1", "c3", "b4", "c6", "d7"]
    assert delivered[:len(runnable)] == runnable
    assert delivered[len(runnable):] == ["a0", "a2", "a5"]


async def test_stats_count_states_and_recent_deliveries(world: World) -> None:
    await world.destination("hook")
    await world.destination("held", paused=True)
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        await send(service, world.source, [event(f"m{i}", f"u{i}") for i in range(5)])
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 5)

        async def counted() -> admin_pb2.GetStatsResponse | None:
            stats = await adm.stub.GetStats(admin_pb2.GetStatsRequest(), metadata=AUTH)
            hook = next(d for d in stats.destinations if d.destination_id == "hook")
            return stats if hook.counts.succeeded == 5 else None

        stats = await eventually(counted, within=5, every=0.05, what="5 deliveries counted")
        by_id = {d.destination_id: d for d in stats.destinations}
        one = await adm.stub.GetStats(admin_pb2.GetStatsRequest(destination_id="held"),
                                      metadata=AUTH)
    assert by_id["hook"].counts == admin_pb2.StateCounts(succeeded=5)
    assert by_id["hook"].delivered_per_second == pytest.approx(5 / 60)
    assert by_id["held"].counts == admin_pb2.StateCounts(pending=5)
    assert by_id["held"].paused
    assert by_id["held"].oldest_pending_seconds > 0
    [tenant] = stats.tenants
    assert tenant.counts == admin_pb2.StateCounts(pending=5, succeeded=5)
    assert [d.destination_id for d in one.destinations] == ["held"]


async def test_job_selectors_are_checked(world: World) -> None:
    async with admin(world.database) as adm:
        for selector, text in [
            (admin_pb2.JobSelector(), "give job_ids or a filter"),
            (admin_pb2.JobSelector(job_ids=[1], filter="job_id = 1"), "not both"),
            (admin_pb2.JobSelector(job_ids=[-4]), "positive"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(selector=selector),
                                         metadata=AUTH)
            assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert text in (failure.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=999), metadata=AUTH)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as token:
            await adm.stub.ListJobs(admin_pb2.ListJobsRequest(page_token="bm9wZQ=="),
                                    metadata=AUTH)
        assert token.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_an_abort_rolled_back_by_a_deadlock_with_a_router_flush_runs_again(
        world: World) -> None:
    """A router's flush counts its outcomes into a destination's delivery_counts row, then
    share-locks a blocker to park jobs behind it. An operator's abort of that blocker updates
    it, then counts into the same row. Postgres breaks the cycle by rolling one back: when it
    is the abort (the first to wait, so the first to check), the operator must not see it."""
    await world.destination("hook", **SLOW_RETRIES)
    world.webhook.answer = lambda _: Answer(503)
    async with ingest(world.database) as service, admin(world.database) as adm:
        async with router(world.database):
            [job_id] = await send(service, world.source, [event("m1", "alice")])
            await _wait_state(world, job_id, "failed")  # a row of its own, to abort
        async with await psycopg.AsyncConnection.connect(world.database) as flush:
            # Postgres checks for a deadlock in whichever waiter reaches deadlock_timeout
            # first, and rolls that one back: make it the abort, whatever the timing.
            await flush.execute("SET deadlock_timeout = '30s'")
            # The flush, part one: outcomes counted, this 10-second bucket and the next.
            await flush.execute(
                "INSERT INTO delivery_counts (destination_key, bucket, succeeded)"
                " SELECT destination_key,"
                "        to_timestamp((floor(extract(epoch FROM now()) / 10) + b) * 10), 1"
                " FROM jobs, generate_series(0, 1) AS b WHERE job_id = %s"
                " ON CONFLICT (destination_key, bucket) DO UPDATE"
                " SET succeeded = delivery_counts.succeeded + 1", (job_id,))
            abort = asyncio.ensure_future(adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(
                selector=admin_pb2.JobSelector(job_ids=[job_id])), metadata=AUTH))
            await _until_waiting_for_a_lock(world, "relayq-admin")
            # Part two: the blocker the abort has just changed, share-locked to park behind.
            await flush.execute("SELECT 1 FROM jobs WHERE job_id = %s FOR SHARE", (job_id,))
            await flush.rollback()
        answer = await asyncio.wait_for(abort, 30)
    assert (answer.matched, answer.changed) == (1, 1)
    assert (await states(world.conn))[job_id] == "aborted"


async def _until_waiting_for_a_lock(world: World, application: str) -> None:
    async def waiting() -> bool:
        cur = await world.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND wait_event_type = 'Lock'", (application,))
        row = await cur.fetchone()
        return bool(row and row[0])

    await eventually(waiting, within=4, every=0.02, what=f"{application} waiting for a lock")


async def test_operators_retrying_and_aborting_beside_a_busy_router_lose_nothing(
        world: World) -> None:
    """Retries and aborts by filter race the router's own outcomes. Afterwards every job is
    finished, no job waits behind a finished one, and users the operator left alone kept
    their order exactly."""
    await world.destination("hook", max_attempts=3, max_retry_window_s=0)
    touched = [f"t{i}" for i in range(5)]
    untouched = [f"u{i}" for i in range(10)]

    def answer(delivery: Received) -> Answer:
        roll = hash((delivery.job_id, delivery.attempt)) % 100
        return Answer(503) if roll < 30 else Answer(404) if roll < 33 else OK

    world.webhook.answer = answer
    users = touched + untouched
    events = [event(f"m{i}", users[i % len(users)]) for i in range(450)]
    in_touched = ", ".join(f"'{u}'" for u in touched)
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        ids = await send(service, world.source, events)
        for _ in range(15):
            await adm.stub.AbortJobs(admin_pb2.AbortJobsRequest(selector=admin_pb2.JobSelector(
                filter=f"user_id IN ({in_touched}) AND state IN ('failed', 'waiting')")),
                metadata=AUTH)
            await asyncio.sleep(0.05)
            await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(selector=admin_pb2.JobSelector(
                filter=f"user_id IN ({in_touched}) AND state = 'aborted' AND attempts < 3")),
                metadata=AUTH)
            await asyncio.sleep(0.05)
        await wait_until_finished(world.conn, len(ids))
    cur = await world.conn.execute(
        "SELECT count(*) FROM jobs w JOIN jobs b ON b.job_id = w.blocked_by"
        " WHERE w.state = 'waiting'")
    assert (await cur.fetchone() or [None])[0] == 0
    final = await states(world.conn)
    assert set(final.values()) <= {"succeeded", "aborted"}
    cur = await world.conn.execute(
        "SELECT state::text, count(*) FROM job_statuses WHERE actor = 'admin:operator'"
        " GROUP BY 1")
    actions = dict(await cur.fetchall())
    assert actions.get("aborted", 0) > 0, actions  # the race was really run
    assert actions.get("failed", 0) > 0, actions
    by_user: dict[str, list[int]] = {u: [] for u in untouched}
    for delivery in world.webhook.oks:
        if delivery.user_id in by_user:
            by_user[delivery.user_id].append(delivery.job_id)
    user_of = {job_id: e.user_id for job_id, e in zip(ids, events, strict=True)}
    for user, delivered in by_user.items():
        expected = [j for j in ids if user_of[j] == user and final[j] == "succeeded"]
        assert delivered == expected, user


async def test_replay_delivers_succeeded_jobs_again_in_order(world: World) -> None:
    await world.destination("hook")
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        ids = await send(service, world.source, [event(f"m{i}", "alice") for i in range(3)])
        await wait_until_finished(world.conn, 3)
        selector = admin_pb2.JobSelector(filter="user_id = 'alice' AND job_id <= "
                                                f"{ids[1]}")
        plain = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=selector, dry_run=True), metadata=AUTH)
        assert plain.matched == 0  # succeeded jobs are not retried without replay
        dry = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=selector, dry_run=True, replay=True), metadata=AUTH)
        assert (dry.matched, dry.changed) == (2, 0)
        done = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=selector, replay=True, reason="sink lost a day"), metadata=AUTH)
        assert (done.matched, done.changed) == (2, 2)
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 5)
        job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=ids[0]), metadata=AUTH)
    assert [r.message_id for r in world.webhook.oks] == ["m0", "m1", "m2", "m0", "m1"]
    assert [r.attempt for r in world.webhook.oks[3:]] == [2, 2]
    assert [(h.state, h.actor, h.reason) for h in job.history][1:3] == [
        (common_pb2.JOB_STATE_FAILED, "admin:operator", "sink lost a day"),
        (common_pb2.JOB_STATE_SUCCEEDED, job.history[2].actor, "")]


async def test_a_retried_abort_goes_before_its_users_job_the_router_already_queued(
        world: World) -> None:
    """The router holds alice's next job ready (a rate limit makes it wait) when an operator
    retries her aborted earlier job: on relayq_reorder the router drops what it only queued
    and lets Postgres order again, so the retried job goes first."""
    await world.destination("hook", rate_per_second=0.5, rate_burst=1)
    world.webhook.answer = fail_first({"m0"}, status=404)
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        ids = await send(service, world.source, [event(f"m{i}", "alice") for i in range(3)])
        await _wait_state(world, ids[0], "aborted")  # m1 now waits two seconds for a token
        retried = await adm.stub.RetryJobs(admin_pb2.RetryJobsRequest(
            selector=admin_pb2.JobSelector(job_ids=[ids[0]])), metadata=AUTH)
        assert retried.changed == 1
        await wait_until_finished(world.conn, 3)
    assert [(r.message_id, r.attempt) for r in world.webhook.oks] == [
        ("m0", 2), ("m1", 1), ("m2", 1)]
