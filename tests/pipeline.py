"""A whole pipeline for tests: a tenant and source, real sinks, helpers to send and wait.

Registered as a pytest plugin in conftest.py, so the `world` and `web` fixtures are available
everywhere.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import json_format
from psycopg import AsyncConnection, sql

from filterlang.events import compile_event_filter
from jobsdb import jobs, keyspace
from relayq.v1 import ingest_pb2
from tests import factories
from tests.helpers import auth, event
from tests.poll import eventually
from tests.services import Ingest, Router, ingest, router
from tests.sinks import OK, Answer, GrpcSink, Received, WebhookSink

FAST_RETRIES = {"min_backoff_ms": 20, "max_backoff_ms": 200}


@dataclass
class World:
    conn: AsyncConnection[Any]
    database: str
    tenant: int
    source: factories.Source
    webhook: WebhookSink
    grpc_sink: GrpcSink

    async def destination(self, destination_id: str, *, kind: str = "webhook",
                          **columns: Any) -> int:
        endpoint = self.webhook.url if kind == "webhook" else self.grpc_sink.endpoint
        key = await factories.destination(self.conn, self.tenant, destination_id,
                                          endpoint=endpoint, kind=kind,
                                          **{**FAST_RETRIES, **columns})
        await factories.connect(self.conn, self.source.key, key)
        return key


@pytest.fixture
async def web(conn: AsyncConnection[Any]) -> factories.Source:
    """Source `web` of tenant acme, connected to one destination `d1` (nothing listens)."""
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    await factories.connect(conn, source.key, await factories.destination(conn, tenant, "d1"))
    return source


@pytest.fixture
async def world(database: str, conn: AsyncConnection[Any]) -> AsyncIterator[World]:
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    webhook, grpc_sink = WebhookSink(), GrpcSink()
    await webhook.start()
    await grpc_sink.start()
    try:
        yield World(conn, database, tenant, source, webhook, grpc_sink)
    finally:
        await webhook.stop()
        await grpc_sink.stop()


async def send(service: Ingest, source: factories.Source, events: list[ingest_pb2.Event]
               ) -> list[int]:
    """Ingest events in batches of 100; returns the ids of the jobs they make, in order: for
    each accepted event, one per destination it is addressed to (those it names, or every
    enabled connection of the source) whose filter takes it, in destination order (what
    ingest answered before the event log; routers decide it now when they read the event)."""
    accepted: list[tuple[ingest_pb2.Event, int]] = []
    for start in range(0, len(events), 100):
        batch = events[start:start + 100]
        response = await service.stub.Ingest(
            ingest_pb2.IngestRequest(events=batch),
            metadata=auth(source.write_key), timeout=10)
        accepted += [(e, r.event_id) for e, r in zip(batch, response.results, strict=True)
                     if r.status == ingest_pb2.EventResult.ACCEPTED]
    async with await AsyncConnection.connect(service.app.config.database_url) as conn:
        cur = await conn.execute(
            "SELECT d.id, c.destination_key, c.slot, c.event_filter FROM connections c"
            " JOIN destinations d USING (destination_key)"
            " WHERE c.source_key = %s AND c.enabled ORDER BY c.destination_key",
            (source.key,))
        connected = {row[0]: (row[1], row[2], row[3]) for row in await cur.fetchall()}
    ids: list[int] = []
    for e, event_id in accepted:
        named = [connected[d] for d in e.destination_ids if d in connected]
        for _, slot, text in sorted(set(named)) if e.destination_ids else connected.values():
            subscription = compile_event_filter(text) if text else None
            if subscription is None or subscription.matches(_document(e)):
                ids.append(keyspace.job_id(event_id, slot))
    return ids


def _document(e: ingest_pb2.Event) -> dict[str, Any]:
    """The fields of an event as connection filters read them (ingest builds the document)."""
    document: dict[str, Any] = {"messageId": e.message_id}
    for name, key in (("type", "type"), ("event", "event"), ("user_id", "userId"),
                      ("anonymous_id", "anonymousId")):
        if getattr(e, name):
            document[key] = getattr(e, name)
    document["properties"] = (json_format.MessageToDict(e.properties)
                              if e.HasField("properties") else json.loads(e.payload_json or "{}"))
    if e.context_json:
        document["context"] = json.loads(e.context_json)
    return document


async def states(conn: AsyncConnection[Any],
                 selection: jobs.Selection = jobs.EVERYTHING) -> dict[int, str]:
    """Every job's state, as operators see them (jobsdb.jobs: rows and the event log)."""
    found: dict[int, str] = {}
    after = 0
    while True:
        async with conn.transaction():
            page = await jobs.list_jobs(conn, selection, None, after=after, limit=1000,
                                        include_payload=False)
        found.update((r.job_id, r.state) for r in page.rows)
        if page.more_after is None:
            return found
        after = page.more_after


async def jobs_of(conn: AsyncConnection[Any], destination_key: int) -> dict[int, str]:
    """The states of one destination's jobs."""
    return await states(conn, jobs.Selection(sql.SQL("j.destination_key = %(destination)s"),
                                             {"destination": destination_key}))


async def wait_until_finished(conn: AsyncConnection[Any], count: int, within: float = 60
                              ) -> None:
    """Poll with a deadline until `count` jobs are succeeded or aborted."""

    done = 0

    async def finished() -> bool:
        nonlocal done
        done = sum(s in ("succeeded", "aborted") for s in (await states(conn)).values())
        return bool(done >= count)

    async def unfinished() -> str:
        cur = await conn.execute(
            "SELECT job_id, user_id, state::text, attempts, blocked_by, retry_at - now()"
            " FROM jobs WHERE state NOT IN ('succeeded', 'aborted') ORDER BY job_id LIMIT 20")
        stuck = "\n".join(str(r) for r in await cur.fetchall())
        cur = await conn.execute("SELECT partition, frontier FROM router_leases"
                                 " WHERE frontier > 0 ORDER BY partition LIMIT 8")
        frontiers = await cur.fetchall()
        return (f"{done} of {count} jobs finished; unfinished rows:\n{stuck}\n"
                f"frontiers: {frontiers}\n")

    await eventually(finished, within=within, what=unfinished)


async def router_sees(running: Router, destination_id: str, **wanted: Any) -> None:
    """Until a running router has heard of a destination's change (NOTIFY relayq_config
    arrives when it arrives)."""
    engine = running.app.engine
    assert engine is not None
    await eventually(
        lambda: any(d.id == destination_id and all(getattr(d, k) == v for k, v in wanted.items())
                    for d in engine.destinations.values()),
        what=f"the router seeing {destination_id} with {wanted}")


async def router_connects(running: Router, source_key: int, destination_id: str) -> None:
    """Until a running router fans a source's events out to a destination: it loads
    connections when NOTIFY relayq_config arrives, moments after the change, and an event it
    reads before then is settled without that destination (see test_ingest's xfail)."""
    engine = running.app.engine
    assert engine is not None

    def connected() -> bool:
        keys = {d.destination_key for d in engine.destinations.values() if d.id == destination_id}
        return any(r.destination_key in keys for r in engine.routing.routes(source_key))

    await eventually(connected, what=f"the router fanning source {source_key} out to"
                                     f" {destination_id}")


async def recorded_attempts(conn: AsyncConnection[Any]) -> dict[int, int]:
    """Attempts on record per job: the history of jobs with rows, and the deliveries of jobs
    read from the log (their first attempts that succeeded)."""
    recorded: dict[int, int] = defaultdict(int)
    cur = await conn.execute("SELECT job_id, count(*) FROM job_statuses GROUP BY job_id")
    for job_id, attempts in await cur.fetchall():
        recorded[job_id] += attempts
    cur = await conn.execute(
        "SELECT (x.event_id << 16) | c.slot, count(*)"
        " FROM deliveries d CROSS JOIN LATERAL unnest(d.event_ids) AS x(event_id)"
        " JOIN events e ON e.event_id = x.event_id"
        " JOIN connections c ON c.source_key = e.source_key"
        "  AND c.destination_key = d.destination_key"
        " GROUP BY 1")
    for job_id, attempts in await cur.fetchall():
        recorded[job_id] += attempts
    return dict(recorded)


def random_answers(seed: int, fail: float, abort: float) -> Any:
    """A random but reproducible answer per (job, attempt)."""

    def answer(delivery: Received) -> Answer:
        roll = random.Random(f"{seed}:{delivery.job_id}:{delivery.attempt}").random()
        if roll < abort:
            return Answer(404, body="no such thing")
        if roll < abort + fail:
            return Answer(503, body="try later")
        return OK

    return answer


def check_order(ids_by_user: dict[str, list[int]], oks: list[Received],
                 final: dict[int, str]) -> None:
    """Each user's successful deliveries arrived in ingest order, each job exactly once."""
    seen: dict[str, list[int]] = defaultdict(list)
    for delivery in oks:
        seen[delivery.user_id].append(delivery.job_id)
    for user, ids in ids_by_user.items():
        expected = [j for j in ids if final[j] == "succeeded"]
        assert seen[user] == expected, user


async def deliver_under_random_failures(world: World, sink: Any, seed: int, *, users: int,
                                        events: int, **router_env: str) -> dict[str, list[int]]:
    """Send `events` events of `users` users through a router while the sink fails at random
    (30% retryable, 5% aborting). Checks that every job ended succeeded or aborted, that each
    user's accepted jobs reached the sink in order, and that every attempt the sink saw is on
    record exactly once. Returns each user's job ids in ingest order."""
    sink.answer = random_answers(seed, fail=0.3, abort=0.05)
    rng = random.Random(seed)
    names = [f"user-{i}" for i in range(users)]
    sent = [event(f"m{i}", rng.choice(names)) for i in range(events)]
    async with ingest(world.database) as service, router(world.database, **router_env):
        ids = await send(service, world.source, sent)
        await wait_until_finished(world.conn, len(ids))
    final = await states(world.conn)
    assert set(final.values()) <= {"succeeded", "aborted"}
    ids_by_user: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(sent, ids, strict=True):
        ids_by_user[e.user_id].append(job_id)
    check_order(ids_by_user, sink.oks, final)
    recorded = await recorded_attempts(world.conn)
    attempts: dict[int, int] = defaultdict(int)
    for delivery in sink.received:
        attempts[delivery.job_id] += 1
    assert recorded == dict(attempts)
    return ids_by_user
