"""relayq-ingest against a real Postgres and a real gRPC server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from psycopg import AsyncConnection, sql

from ingest_service import validate
from ingest_service.committer import EventsRefused
from ingest_service.config import Limits
from jobsdb.ingest import NewEvent
from jobsdb.keyspace import event_of, job_id, partition_of
from jobsdb.write_keys import SourceRoute
from relayq.v1 import ingest_pb2
from tests import factories
from tests.helpers import auth, count, event
from tests.pipeline import World, router_connects, states, wait_until_finished
from tests.pipeline import send as pipeline_send
from tests.poll import eventually
from tests.services import Ingest, ingest, router

Status = ingest_pb2.EventResult.Status


async def send(service: Ingest, write_key: str, *events: ingest_pb2.Event,
               partial: bool = False) -> ingest_pb2.IngestResponse:
    request = ingest_pb2.IngestRequest(events=events, partial_success=partial)
    return await service.stub.Ingest(request, metadata=auth(write_key), timeout=10)


async def stored(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    """The event log: each accepted event's row, in event order (the document parsed)."""
    cur = await conn.execute(
        "SELECT event_id, source_key, user_id, message_id, destinations, document,"
        " ordering_partition FROM events ORDER BY event_id"
    )
    return [(*r[:5], json.loads(r[5]), r[6]) for r in await cur.fetchall()]


async def message_ids(conn: AsyncConnection[Any]) -> list[str]:
    return [r[3] for r in await stored(conn)]


async def slots(conn: AsyncConnection[Any], source: factories.Source) -> dict[int, int]:
    """Destination key -> the connection's slot (the low bits of its jobs' ids)."""
    cur = await conn.execute(
        "SELECT destination_key, slot FROM connections WHERE source_key = %s", (source.key,))
    return dict(await cur.fetchall())


@pytest.fixture
async def setup(conn: AsyncConnection[Any]) -> dict[str, Any]:
    """Tenant acme, source web connected to d1 and d2 (enabled) and d3 (disabled)."""
    tenant = await factories.tenant(conn)
    web = await factories.source(conn, tenant)
    d1 = await factories.destination(conn, tenant, "d1")
    d2 = await factories.destination(conn, tenant, "d2")
    d3 = await factories.destination(conn, tenant, "d3")
    await factories.connect(conn, web.key, d1)
    await factories.connect(conn, web.key, d2)
    await factories.connect(conn, web.key, d3, enabled=False)
    return {"tenant": tenant, "web": web, "d1": d1, "d2": d2, "d3": d3}


async def test_events_are_stored_once_and_become_one_job_per_connected_destination(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Each event is one row of the log, whatever is connected; its jobs (one per enabled
    connection) exist without rows, pending until a router reads them."""
    web = setup["web"]
    async with ingest(database) as service:
        response = await send(
            service, web.write_key,
            event("m1", "alice", revenue=12.5, items=[{"sku": "a"}], note="tab\there \\ \"q\""),
            event("m2", "bob"),
        )
    assert [r.status for r in response.results] == [Status.ACCEPTED, Status.ACCEPTED]
    assert response.accepted == 2
    assert [r.destinations for r in response.results] == [2, 2]  # d3's connection is off
    assert all(not r.job_ids and r.filtered_out == 0 for r in response.results)

    rows = await stored(conn)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        (response.results[0].event_id, web.key, "alice", "m1", None),
        (response.results[1].event_id, web.key, "bob", "m2", None),
    ]
    assert [r[6] for r in rows] == [partition_of("alice", 64), partition_of("bob", 64)]
    assert await count(conn, "jobs") == 0
    slot = await slots(conn, web)
    assert await states(conn) == {
        job_id(r.event_id, slot[d]): "pending"
        for r in response.results for d in (setup["d1"], setup["d2"])}
    document = rows[0][5]
    assert document["properties"] == {
        "revenue": 12.5, "items": [{"sku": "a"}], "note": "tab\there \\ \"q\""}
    assert document["messageId"] == "m1"
    assert document["userId"] == "alice"
    assert document["event"] == "Order Completed"
    assert document["type"] == "track"
    assert document["receivedAt"].endswith("Z")


async def test_event_ids_follow_the_order_of_events_in_a_batch(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Event order is delivery order for a user: a big batch must not come out shuffled."""
    async with ingest(database) as service:
        response = await send(service, setup["web"].write_key,
                              *(event(f"m{i:04d}", "alice") for i in range(1000)))
    ids = [r.event_id for r in response.results]
    assert ids == sorted(set(ids))
    assert ids[0] > 0
    assert [(r[0], r[3]) for r in await stored(conn)] == [
        (event_id, f"m{i:04d}") for i, event_id in enumerate(ids)]


async def test_event_ids_answered_grow_from_request_to_request_and_name_the_stored_event(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """A client sending one request after another (a user's events in order) is answered ids
    that grow in that order, and each answered id is the row holding that event; a
    duplicate, which stored nothing, is answered none."""
    web = setup["web"]
    answered: list[tuple[str, int]] = []
    async with ingest(database) as service:
        for r in range(5):
            response = await send(service, web.write_key,
                                  *(event(f"r{r}-{i}", f"u{i % 3}") for i in range(4)))
            answered += [(a.message_id, a.event_id) for a in response.results]
        again = await send(service, web.write_key, event("r0-0"), event("r5-0"))
    assert [a.status for a in again.results] == [Status.DUPLICATE, Status.ACCEPTED]
    assert (again.results[0].event_id, again.results[0].destinations) == (0, 0)
    answered.append((again.results[1].message_id, again.results[1].event_id))
    ids = [event_id for _, event_id in answered]
    assert ids == sorted(set(ids))
    assert [(r[3], r[0]) for r in await stored(conn)] == answered


async def test_destinations_count_what_an_event_is_addressed_to_before_filters(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """`destinations`: the destinations named (each once), else every enabled connection;
    a connection's filter does not lower it (routers apply filters when they read), and the
    deprecated per-event fields stay empty."""
    web = setup["web"]
    await conn.execute("UPDATE connections SET event_filter = %s WHERE destination_key = %s",
                       ("event = 'Nobody Sends This'", setup["d2"]))
    named_both = event("m2")
    named_both.destination_ids.extend(["d2", "d1", "d2"])
    named_one = event("m3")
    named_one.destination_ids.append("d1")
    async with ingest(database) as service:
        response = await send(service, web.write_key, event("m1"), named_both, named_one)
        again = await send(service, web.write_key, event("m1"))
    assert [r.destinations for r in response.results] == [2, 2, 1]
    assert [r.filtered_out for r in response.results] == [0, 0, 0]
    assert [list(r.job_ids) for r in response.results] == [[], [], []]
    assert again.results[0].status == Status.DUPLICATE
    assert again.results[0].destinations == 0
    # What was named is kept with the event, for the routers (d1 and d2 in the order named).
    assert [r[4] for r in await stored(conn)] == [
        None, [setup["d2"], setup["d1"]], [setup["d1"]]]


async def test_what_ingest_stores_does_not_depend_on_how_many_destinations_are_connected(
    database: str, conn: AsyncConnection[Any]
) -> None:
    """The same events sent to a source with one connection and to one with ten: one row of
    the log per event for both, of the same size, and no other table grows by a row per
    destination (the jobs exist, derived, without rows)."""
    tenant = await factories.tenant(conn)
    narrow = await factories.source(conn, tenant, "narrow")
    wide = await factories.source(conn, tenant, "wide")
    await factories.connect(conn, narrow.key, await factories.destination(conn, tenant, "n0"))
    for i in range(10):
        await factories.connect(conn, wide.key,
                                await factories.destination(conn, tenant, f"w{i}"))
    batch = [event(f"m{i:03d}", f"user-{i % 7}", n=i) for i in range(200)]

    growth: dict[str, dict[str, int]] = {}
    async with ingest(database) as service:
        for source in (narrow, wide):
            before = await _rows_per_table(conn)
            response = await send(service, source.write_key, *batch)
            after = await _rows_per_table(conn)
            assert response.accepted == 200
            assert {r.destinations for r in response.results} == (
                {1} if source is narrow else {10})
            growth[source.id] = {t: after[t] - before[t] for t in after if after[t] != before[t]}
    assert growth["narrow"] == growth["wide"] == {"events": 200, "dedup_keys": 200}

    cur = await conn.execute(
        "SELECT source_key, count(*), sum(pg_column_size(e.*)) FROM events e"
        " GROUP BY source_key ORDER BY source_key")
    (_, narrow_rows, narrow_bytes), (_, wide_rows, wide_bytes) = await cur.fetchall()
    assert narrow_rows == wide_rows == 200
    assert wide_bytes == narrow_bytes
    jobs_by_source: dict[int, int] = {}
    for job, _ in (await states(conn)).items():
        cur = await conn.execute("SELECT source_key FROM events WHERE event_id = %s",
                                 (event_of(job),))
        source_key = (await cur.fetchone() or [0])[0]
        jobs_by_source[source_key] = jobs_by_source.get(source_key, 0) + 1
    assert jobs_by_source == {narrow.key: 200, wide.key: 2000}


async def _rows_per_table(conn: AsyncConnection[Any]) -> dict[str, int]:
    """Rows in each table of the schema (a partitioned table with its partitions)."""
    cur = await conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
        " AND NOT c.relispartition ORDER BY 1")
    tables = [r[0] for r in await cur.fetchall()]
    counts: dict[str, int] = {}
    for table in tables:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        counts[table] = int((await cur.fetchone() or [0])[0])
    return counts


async def test_destination_ids_restrict_fan_out(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    async with ingest(database) as service:
        only_d2 = event("m1")
        only_d2.destination_ids.append("d2")
        response = await send(service, setup["web"].write_key, only_d2)
    assert response.results[0].destinations == 1
    assert [r[4] for r in await stored(conn)] == [[setup["d2"]]]
    slot = await slots(conn, setup["web"])
    assert await states(conn) == {job_id(response.results[0].event_id, slot[setup["d2"]]):
                                  "pending"}


async def test_struct_properties_and_timestamp_for_grpcurl_users(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    properties = struct_pb2.Struct()
    properties.update({"plan": "pro", "seats": 3})
    sent = ingest_pb2.Event(
        message_id="m1", anonymous_id="anon-7", properties=properties,
        timestamp=timestamp_pb2.Timestamp(seconds=1_790_000_000),
    )
    async with ingest(database) as service:
        await send(service, setup["web"].write_key, sent)
    rows = await stored(conn)
    assert rows[0][2] == "anon-7"
    assert rows[0][5]["properties"] == {"plan": "pro", "seats": 3}
    assert rows[0][5]["timestamp"] == "2026-09-21T14:13:20Z"


async def test_a_message_id_is_stored_once(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    web = setup["web"]
    async with ingest(database) as service:
        first = await send(service, web.write_key, event("m1"), event("m2"))
        again = await send(service, web.write_key, event("m2"), event("m3"))
    assert [r.status for r in first.results] == [Status.ACCEPTED, Status.ACCEPTED]
    assert [r.status for r in again.results] == [Status.DUPLICATE, Status.ACCEPTED]
    assert again.duplicates == 1
    assert (again.results[0].event_id, again.results[0].destinations) == (0, 0)
    assert await message_ids(conn) == ["m1", "m2", "m3"]
    assert len(await states(conn)) == 6  # three events, two destinations each


async def test_concurrent_requests_share_commits(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Two hundred single-event requests at once commit in far fewer transactions."""
    web = setup["web"]
    async with ingest(database, RELAYQ_INGEST_FLUSH_DELAY_MS="5") as service:
        cur = await conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        before = (await cur.fetchone() or [0])[0]
        responses = await asyncio.gather(
            *(send(service, web.write_key, event(f"m{i}", f"u{i}")) for i in range(200)))
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        cur = await conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        after = (await cur.fetchone() or [0])[0]
    assert all(r.accepted == 1 for r in responses)
    assert await count(conn, "events") == 200
    # Statistics are flushed lazily, so this can undercount but never overcount commits.
    assert after - before < 100


async def test_same_key_in_one_group_commit_is_stored_once(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """A client retrying while its first request still waits to be flushed."""
    web = setup["web"]
    async with ingest(database, RELAYQ_INGEST_FLUSH_DELAY_MS="50") as service:
        responses = await asyncio.gather(
            *(send(service, web.write_key, event("same")) for _ in range(5)))
    statuses = sorted(r.results[0].status for r in responses)
    assert statuses == [Status.ACCEPTED] + [Status.DUPLICATE] * 4
    assert await message_ids(conn) == ["same"]


async def test_partial_success_stores_valid_events_and_reports_the_rest(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    bad = ingest_pb2.Event(message_id="m2", user_id="u", payload_json="[1, 2]")
    async with ingest(database) as service:
        response = await send(service, setup["web"].write_key, event("m1"), bad, event("m3"),
                              partial=True)
    assert [r.status for r in response.results] == [
        Status.ACCEPTED, Status.REJECTED, Status.ACCEPTED]
    assert response.results[1].reason == "payload_json: must be a JSON object, got list"
    assert (response.accepted, response.rejected) == (2, 1)
    assert await message_ids(conn) == ["m1", "m3"]
    # A rejected event does not claim its message id: fixed and resent, it is accepted.
    async with ingest(database) as service:
        fixed = await send(service, setup["web"].write_key, event("m2"))
    assert fixed.results[0].status == Status.ACCEPTED


async def test_events_postgres_cannot_store_are_rejected_under_partial_success(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Caught before the group commit: named, rejected, and the rest of the batch stored."""
    huge = ingest_pb2.Event(message_id="m2", user_id="u", payload_json='{"n": 1e1000000}')
    tiny = ingest_pb2.Event(message_id="m3", user_id="u", payload_json='{"n": 1e-16384}')
    late = ingest_pb2.Event(message_id="m4", user_id="u",
                            timestamp=timestamp_pb2.Timestamp(seconds=2**62))
    async with ingest(database) as service:
        response = await send(service, setup["web"].write_key, event("m1"), huge, tiny, late,
                              event("m5"), partial=True)
    assert [r.status for r in response.results] == [
        Status.ACCEPTED, Status.REJECTED, Status.REJECTED, Status.REJECTED, Status.ACCEPTED]
    assert response.results[1].reason.startswith("payload_json: the number 1e1000000 is")
    assert response.results[2].reason.startswith("payload_json: the number 1e-16384 is")
    assert response.results[3].reason.startswith("timestamp: seconds 4611686018427387904")
    assert await message_ids(conn) == ["m1", "m5"]


async def test_a_group_commit_postgres_refuses_names_the_event_and_stores_the_others(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Past validation (as a document validation missed would be): the ingest's own committer
    against the real Postgres finds the refused event and stores the others of the flush.
    (Documents are stored as text, which Postgres refuses only with a NUL in it: validation
    refuses everything jsonb would, numbers beyond numeric included, which the test of
    Postgres's limits above holds against Postgres itself.)"""
    keys = (setup["d1"],)
    web = setup["web"]

    def new(message_id: str, document: str) -> NewEvent:
        return NewEvent(web.key, setup["tenant"], message_id, "u", document, keys)

    async with ingest(database, RELAYQ_INGEST_FLUSH_DELAY_MS="50") as service:
        committer = service.app._committer
        assert committer is not None
        results = await asyncio.gather(
            committer.submit([new("a", "{}")]),
            committer.submit([new("b1", "{}"), new("b2", '{"n": "\x00"}')]),
            committer.submit([new("c", '{"ok": true}')]), return_exceptions=True)
    refused = results[1]
    assert isinstance(refused, EventsRefused), results
    assert list(refused.refused) == [1]
    assert refused.refused[1].startswith("payload: Postgres refuses it: ")
    assert sorted(await message_ids(conn)) == ["a", "c"]


# Literals at and around each of Postgres's limits on numeric input.
_NUMBERS = [
    "1e131071", "1e131072", "-1e131072", "9.9e131071", "12345678901234567890e131052",
    "12345678901234567890e131053", "0.001e131074", "0.001e131075", "1e-16383", "1e-16384",
    "1.5e-16382", "1.5e-16383", "1.50e-16382", "0e-16383", "0e-16384", "0e999999",
    "0e1073741822", "0e1073741823", "0e-1073741823", "1E+5", "-0.0", "1e400", "1e-400",
    "1" + "0" * 5000, "0." + "0" * 16382 + "1", "0." + "0" * 16383 + "1",
    "1." + "0" * 16383, "1." + "0" * 16384, "1." + "0" * 16000 + "e-383",
    "1." + "0" * 16000 + "e-384", "1e0000000000000000000000001",
]


async def test_payload_numbers_are_refused_exactly_when_postgres_refuses_them(
    conn: AsyncConnection[Any],
) -> None:
    limits = Limits(max_batch_events=1, max_event_bytes=1 << 20, max_request_bytes=1 << 22)
    route = SourceRoute(source_key=1, source_id="web", tenant_key=1, tenant_id="acme",
                        enabled=True, rate_per_second=0.0, rate_burst=0, destinations={},
                        destination_keys=(1,))
    for literal in _NUMBERS:
        text = '{"n": ' + literal + "}"
        try:
            async with conn.transaction():
                await conn.execute("SELECT %s::jsonb", (text,))
            postgres_takes_it = True
        except psycopg.errors.DataError:
            postgres_takes_it = False
        try:
            validate.build_event(ingest_pb2.Event(message_id="m", user_id="u",
                                                  payload_json=text), route, limits, "now")
            we_take_it = True
        except validate.EventRejected:
            we_take_it = False
        assert we_take_it == postgres_takes_it, literal[:60]


async def test_an_event_sent_once_its_source_is_connected_is_delivered(world: World) -> None:
    """Ingest answers `destinations` from the connections committed when it stores the
    event; the destination must get it, however long a router takes to load the change.
    (The reload is held back here by a lock on a table only it reads, the signing secrets:
    what a slow reload does, made certain.)"""
    async with ingest(world.database) as service, router(world.database) as running:
        async with await AsyncConnection.connect(world.database) as holder:
            await holder.execute("LOCK TABLE destination_secrets IN ACCESS EXCLUSIVE MODE")
            await world.destination("late")
            sent = await send(service, world.source.write_key, event("m1", "alice"))
            assert sent.results[0].destinations == 1
            await asyncio.sleep(1.0)  # the router reads the event meanwhile
        await router_connects(running, world.source.key, "late")
        job = job_id(sent.results[0].event_id, 1)
        await eventually(lambda: any(r.job_id == job for r in world.webhook.oks),
                         within=5, what="the event delivered to the new connection")


async def test_an_accepted_event_with_a_number_beyond_a_double_is_delivered_through_a_filter(
    world: World,
) -> None:
    """Ingest accepts any number Postgres stores (1e400 is one, beyond a double); routers
    evaluate connection filters over it, and neither it nor other users' events stall."""
    await world.destination("d1")
    await world.conn.execute("UPDATE connections SET event_filter = %s", ("type = 'track'",))
    big = ingest_pb2.Event(message_id="big", user_id="u2", type="track",
                           payload_json='{"big": 1e400}')
    async with ingest(world.database) as service, router(world.database):
        ids = await pipeline_send(service, world.source, [event("m1", "u1"), big,
                                                         event("m3", "u3")])
        await wait_until_finished(world.conn, len(ids), within=5)
    assert sorted(r.message_id for r in world.webhook.oks) == ["big", "m1", "m3"]


async def test_an_event_for_a_source_without_destinations_is_accepted_without_jobs(
    database: str, conn: AsyncConnection[Any]
) -> None:
    """Stored (a destination connected later may be given it) and de-duplicated, for no
    destination."""
    tenant = await factories.tenant(conn)
    lonely = await factories.source(conn, tenant, "lonely")
    async with ingest(database) as service:
        first = await send(service, lonely.write_key, event("m1"))
        again = await send(service, lonely.write_key, event("m1"))
    assert first.results[0].status == Status.ACCEPTED
    assert first.results[0].destinations == 0
    assert first.results[0].event_id > 0
    assert again.results[0].status == Status.DUPLICATE
    assert await message_ids(conn) == ["m1"]
    assert await states(conn) == {}


# --- bad input: a precise status, and nothing written -------------------------------------

def _events(*events: ingest_pb2.Event) -> list[ingest_pb2.Event]:
    return list(events)


def _struct(**fields: Any) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(fields)
    return value


BAD_BATCHES: list[tuple[str, list[ingest_pb2.Event], str, str]] = [
    ("empty batch", [], "events: the batch is empty", "events"),
    ("too many events", [event(f"m{i}") for i in range(11)],
     "events: 11 events exceed the limit of 10 per batch (RELAYQ_INGEST_MAX_BATCH_EVENTS)",
     "events"),
    ("message id twice in a batch", [event("a"), event("b"), event("a")],
     "events[2].message_id 'a' repeats events[0]", "events[2].message_id"),
    ("payload not JSON", [event("ok"), ingest_pb2.Event(
        message_id="m", user_id="u", payload_json="{nope")],
     "events[1].payload_json: invalid JSON", "events[1].payload_json"),
    ("payload not an object", [ingest_pb2.Event(message_id="m", user_id="u", payload_json="42")],
     "events[0].payload_json: must be a JSON object, got int", "events[0].payload_json"),
    ("missing message id", [ingest_pb2.Event(user_id="u", payload_json="{}")],
     "events[0].message_id: required", "events[0].message_id"),
    ("message id too long", [ingest_pb2.Event(message_id="x" * 129, user_id="u")],
     "events[0].message_id: longer than 128 characters", "events[0].message_id"),
    ("message id with a newline", [ingest_pb2.Event(message_id="a\nb", user_id="u")],
     "events[0].message_id: contains control characters", "events[0].message_id"),
    ("no user", [ingest_pb2.Event(message_id="m", payload_json="{}")],
     "events[0].user_id: one of user_id or anonymous_id is required", "events[0].user_id"),
    ("user id too long", [ingest_pb2.Event(message_id="m", user_id="u" * 257)],
     "events[0].user_id: longer than 256 characters", "events[0].user_id"),
    ("event too large", [ingest_pb2.Event(
        message_id="m", user_id="u", payload_json=json.dumps({"x": "y" * 5000}))],
     "events[0].payload_json: 5009 characters, over the limit of 4096 bytes per event"
     " (RELAYQ_INGEST_MAX_EVENT_BYTES)", "events[0].payload_json"),
    ("event too large as a Struct", [ingest_pb2.Event(
        message_id="m", user_id="u", properties=_struct(x="y" * 5000))],
     "bytes exceed the limit of 4096 (RELAYQ_INGEST_MAX_EVENT_BYTES)", "events[0].event"),
    ("payload nested too deep", [ingest_pb2.Event(
        message_id="m", user_id="u", payload_json='{"a":' + "[" * 1500 + "]" * 1500 + "}")],
     "events[0].payload_json: invalid JSON: depth limit exceeded", "events[0].payload_json"),
    ("lone surrogate in payload", [ingest_pb2.Event(
        message_id="m", user_id="u", payload_json='{"a": "\\ud800"}')],
     "events[0].payload_json: invalid JSON: no low surrogate", "events[0].payload_json"),
    ("NUL in payload", [ingest_pb2.Event(
        message_id="m", user_id="u", payload_json='{"a": "\\u0000"}')],
     "events[0].payload: contains a \\u0000 character", "events[0].payload"),
    ("timestamp after year 9999", [event("ok"), ingest_pb2.Event(
        message_id="m", user_id="u", timestamp=timestamp_pb2.Timestamp(seconds=253402300800))],
     "events[1].timestamp: seconds 253402300800 is outside 0001-01-01T00:00:00Z..",
     "events[1].timestamp"),
    ("timestamp at 2^62 seconds", [ingest_pb2.Event(
        message_id="m", user_id="u", timestamp=timestamp_pb2.Timestamp(seconds=2**62))],
     "events[0].timestamp: seconds 4611686018427387904 is outside", "events[0].timestamp"),
    ("timestamp with 2e9 nanos", [ingest_pb2.Event(
        message_id="m", user_id="u", timestamp=timestamp_pb2.Timestamp(nanos=2_000_000_000))],
     "events[0].timestamp: nanos 2000000000 is outside 0..999999999", "events[0].timestamp"),
    ("timestamp with negative nanos", [ingest_pb2.Event(
        message_id="m", user_id="u", timestamp=timestamp_pb2.Timestamp(seconds=1, nanos=-1))],
     "events[0].timestamp: nanos -1 is outside 0..999999999", "events[0].timestamp"),
    ("number too large for Postgres", [event("ok"), ingest_pb2.Event(
        message_id="m", user_id="u", payload_json='{"n": 1e1000000}')],
     "events[1].payload_json: the number 1e1000000 is beyond what Postgres can store: more"
     " than 131072 digits before the decimal point", "events[1].payload_json"),
    ("number too small for Postgres", [ingest_pb2.Event(
        message_id="m", user_id="u", payload_json='{"n": [1e-16384]}')],
     "events[0].payload_json: the number 1e-16384 is beyond what Postgres can store: more"
     " than 16383 digits after the decimal point", "events[0].payload_json"),
    ("unknown destination", [ingest_pb2.Event(
        message_id="m", user_id="u", destination_ids=["nope"])],
     "events[0].destination_ids: 'nope' is not a destination connected to source 'web'",
     "events[0].destination_ids"),
    ("disabled connection named", [ingest_pb2.Event(
        message_id="m", user_id="u", destination_ids=["d3"])],
     "events[0].destination_ids: 'd3' is not a destination connected", "events[0].destination_ids"),
]


@pytest.mark.parametrize(
    ("events", "message", "field"),
    [pytest.param(e, m, f, id=name) for name, e, m, f in BAD_BATCHES],
)
async def test_bad_batches_are_invalid_argument_and_store_nothing(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any],
    events: list[ingest_pb2.Event], message: str, field: str,
) -> None:
    limits = {"RELAYQ_INGEST_MAX_BATCH_EVENTS": "10", "RELAYQ_INGEST_MAX_EVENT_BYTES": "4096"}
    async with ingest(database, **limits) as service:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(service, setup["web"].write_key, *events)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field
    assert await count(conn, "events") == 0
    assert await count(conn, "dedup_keys") == 0


async def test_an_all_or_nothing_rejection_lists_every_bad_event(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    bad = [ingest_pb2.Event(message_id=f"m{i}", user_id="u", payload_json="[]") for i in range(3)]
    async with ingest(database) as service:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(service, setup["web"].write_key, event("fine"), *bad)
    assert "(and 2 more invalid events)" in (caught.value.details() or "")
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    assert [v.field for v in bad_request.field_violations] == [
        "events[1].payload_json", "events[2].payload_json", "events[3].payload_json"]
    assert await count(conn, "events") == 0


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param((), "missing write key", id="no key"),
        pytest.param((("authorization", "Basic abc"),), "missing write key", id="not bearer"),
        pytest.param((("authorization", "Bearer rq_wk_nope"),), "unknown, revoked or expired",
                     id="unknown key"),
    ],
)
async def test_missing_or_unknown_write_keys_are_unauthenticated(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any],
    metadata: tuple[tuple[str, str], ...], message: str,
) -> None:
    async with ingest(database) as service:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.Ingest(
                ingest_pb2.IngestRequest(events=[event("m1")]), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in (caught.value.details() or "")
    assert await count(conn, "events") == 0
    assert await count(conn, "dedup_keys") == 0


async def test_a_revoked_key_stops_working_on_a_running_ingest(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    web = setup["web"]
    async with ingest(database) as service:
        await send(service, web.write_key, event("m1"))  # cached now
        await conn.execute("UPDATE write_keys SET expires_at = now() WHERE source_key = %s",
                           (web.key,))
        refused: list[grpc.aio.AioRpcError] = []
        for attempt in range(50):  # the NOTIFY on relayq_config clears the cache within moments
            try:
                await send(service, web.write_key, event(f"m{attempt + 2}"))
            except grpc.aio.AioRpcError as exc:
                refused.append(exc)
                break
            await asyncio.sleep(0.1)
    assert [e.code() for e in refused] == [grpc.StatusCode.UNAUTHENTICATED], \
        "the revoked key kept working"
    assert "unknown, revoked or expired" in (refused[0].details() or "")
    assert attempt < 20
    # Everything before the refusal stored, nothing of the refused batch.
    cur = await conn.execute("SELECT count(*) FROM events WHERE message_id = %s",
                             (f"m{attempt + 2}",))
    assert await cur.fetchone() == (0,)
    assert await count(conn, "dedup_keys") == attempt + 1


async def test_a_disabled_source_is_permission_denied(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    await conn.execute("UPDATE sources SET enabled = false")
    async with ingest(database) as service:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(service, setup["web"].write_key, event("m1"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "source 'web' is disabled" in (caught.value.details() or "")
    assert await count(conn, "events") == 0
    assert await count(conn, "dedup_keys") == 0


async def test_a_source_over_its_rate_limit_is_resource_exhausted_and_stores_nothing(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    web = setup["web"]
    # So slow that only lifting the limit (not the bucket refilling) can let m3 through.
    await conn.execute("UPDATE sources SET rate_per_second = 0.001, rate_burst = 2")
    # Routes cached for an hour: only the config NOTIFY can bring the lifted limit in time.
    async with ingest(database, RELAYQ_INGEST_ROUTE_CACHE_SECONDS="3600") as service:
        # A batch refused as invalid uses none of the limit.
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await send(service, web.write_key, *(ingest_pb2.Event(
                message_id=f"bad{i}", user_id="u", payload_json="[]") for i in range(5)))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await send(service, web.write_key, event("m1"), event("m2"))  # the whole burst
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(service, web.write_key, event("m3"))
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (error.details() or "").startswith(
            "source 'web' is over its rate limit of 0.001 events/s (burst 2); nothing was stored,"
            " retry in ")
        status = rpc_status.from_call(error)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert 900 < retry.retry_delay.ToTimedelta().total_seconds() <= 1000  # one token
        assert await message_ids(conn) == ["m1", "m2"]

        # Lifting the limit reaches the running ingest within moments.
        await conn.execute("UPDATE sources SET rate_per_second = 0")
        refusals: list[grpc.StatusCode] = []
        for _ in range(50):
            try:
                await send(service, web.write_key, event("m3"))
                break
            except grpc.aio.AioRpcError as exc:
                refusals.append(exc.code())
                await asyncio.sleep(0.1)
    assert set(refusals) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert len(refusals) < 50, "the lifted limit never reached the running ingest"
    assert await message_ids(conn) == ["m1", "m2", "m3"]


async def test_a_request_over_the_size_limit_is_refused(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Over the limit: INVALID_ARGUMENT naming it (not retried by clients); over twice the
    limit gRPC refuses the message unread, with its own RESOURCE_EXHAUSTED."""
    big = [event(f"m{i}", note="x" * 900) for i in range(3)]
    huge = [event(f"m{i}", note="x" * 900) for i in range(6)]
    async with ingest(database, RELAYQ_INGEST_MAX_REQUEST_BYTES="2048") as service:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(service, setup["web"].write_key, *big)
        with pytest.raises(grpc.aio.AioRpcError) as unread:
            await send(service, setup["web"].write_key, *huge)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(r"request: \d+ bytes exceed the limit of 2048"
                        r" \(RELAYQ_INGEST_MAX_REQUEST_BYTES\)", caught.value.details() or "")
    assert unread.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (unread.value.details() or "")
    assert await count(conn, "events") == 0
    assert await count(conn, "dedup_keys") == 0


async def test_ingest_creates_partitions_when_ids_outrun_them(
    database: str, conn: AsyncConnection[Any], setup: dict[str, Any]
) -> None:
    """Maintenance is off here: the write itself notices the missing partition and recovers."""
    await conn.execute("SELECT setval('events_event_id_seq', 7500000)")
    async with ingest(database) as service:
        response = await send(service, setup["web"].write_key, event("m1"))
    assert response.accepted == 1
    assert response.results[0].event_id > 7_500_000
    assert await message_ids(conn) == ["m1"]
    for table in ("events", "jobs", "job_statuses", "deliveries"):
        cur = await conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = %s::regclass", (table,))
        assert (await cur.fetchone() or [0])[0] >= 6, table
