"""ListEvents and GetEvent against real ingest, router, admin and webhook sink: a source's
events by filter and page, and one event's standing at each destination (pending,
delivered, failed, waiting, filtered out, not connected at the time); tenant scoping and
bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from jobsdb.keyspace import slot_of
from relayq.v1 import admin_pb2, common_pb2
from tests import factories
from tests.helpers import event
from tests.pipeline import World, send
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router
from tests.sinks import OK, Answer, Received

AUTH = Admin.auth()
SLOW_RETRIES = {"min_backoff_ms": 600_000, "max_backoff_ms": 600_000}
S = admin_pb2


@dataclass
class Sent:
    adm: Admin
    # message id -> event id
    events: dict[str, int]


def _standing(answer: admin_pb2.GetEventResponse) -> dict[str, int]:
    return {d.destination_id: d.status for d in answer.destinations}


@pytest.fixture
async def sent(world: World) -> AsyncIterator[Sent]:
    """Source `web` with five destinations: `ok` takes everything; `flaky` fails m1 (and so
    holds m2, the same user's); `picky` takes only properties.n = 1; `held` is paused; and
    `late` is connected after the events were sent. m3 names `ok` only."""
    await world.destination("ok")
    await world.destination("flaky", **SLOW_RETRIES)
    await world.destination("picky")
    await world.conn.execute(
        "UPDATE connections SET event_filter = 'properties.n = 1' WHERE destination_key ="
        " (SELECT destination_key FROM destinations WHERE id = 'picky')")
    await world.destination("held", paused=True)
    flaky_slot = 2

    def answer(delivery: Received) -> Answer:
        if delivery.message_id == "m1" and slot_of(delivery.job_id) == flaky_slot:
            return Answer(503, body="flaky is down")
        return OK

    world.webhook.answer = answer
    named = event("m3", "u2", n=1)
    named.destination_ids.append("ok")
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        await send(service, world.source, [event("m1", "u1", n=1), event("m2", "u1", n=2)])
        await send(service, world.source, [named])
        cur = await world.conn.execute("SELECT message_id, event_id FROM events")
        ids = dict(await cur.fetchall())

        async def settled() -> bool:
            got = await adm.stub.GetEvent(S.GetEventRequest(event_id=ids["m2"]), metadata=AUTH)
            first = await adm.stub.GetEvent(S.GetEventRequest(event_id=ids["m1"]),
                                            metadata=AUTH)
            third = await adm.stub.GetEvent(S.GetEventRequest(event_id=ids["m3"]),
                                            metadata=AUTH)
            return (_standing(got).get("flaky") == S.EVENT_STATUS_WAITING
                    and _standing(first).get("picky") == S.EVENT_STATUS_DELIVERED
                    and _standing(first).get("ok") == S.EVENT_STATUS_DELIVERED
                    and _standing(got).get("ok") == S.EVENT_STATUS_DELIVERED
                    and _standing(third).get("ok") == S.EVENT_STATUS_DELIVERED)

        await eventually(settled, within=30, what="the events settled at their destinations")

        async def read_past() -> bool:
            # The frontiers follow the deliveries a moment later: until they pass the
            # events, a connection made now would still get them (pending there).
            cur = await world.conn.execute(
                "SELECT bool_and(l.frontier >= e.event_id) FROM events e"
                " JOIN router_leases l ON l.partition = e.ordering_partition")
            return bool((await cur.fetchone() or [False])[0])

        await eventually(read_past, within=30, what="the frontiers passing the events")
        late = await factories.destination(world.conn, world.tenant, "late",
                                           endpoint=world.webhook.url)
        await factories.connect(world.conn, world.source.key, late)
        yield Sent(adm, ids)


async def test_get_event_says_where_it_stands_at_every_destination(sent: Sent) -> None:
    first = await sent.adm.stub.GetEvent(S.GetEventRequest(event_id=sent.events["m1"]),
                                         metadata=AUTH)
    assert first.event.message_id == "m1"
    assert first.event.user_id == "u1"
    assert first.event.source_id == "web"
    assert first.event.payload["properties"]["n"] == 1
    assert _standing(first) == {
        "flaky": S.EVENT_STATUS_FAILED, "held": S.EVENT_STATUS_PENDING,
        "late": S.EVENT_STATUS_NOT_CONNECTED, "ok": S.EVENT_STATUS_DELIVERED,
        "picky": S.EVENT_STATUS_DELIVERED}
    at = {d.destination_id: d for d in first.destinations}
    # Delivered: when, by which request, with what answer.
    [delivery] = at["ok"].job.history
    assert delivery.state == common_pb2.JOB_STATE_SUCCEEDED
    assert delivery.response == "200"
    assert delivery.started_at.seconds > 0
    assert delivery.actor.startswith("router:")
    # Failed: every attempt, from its row.
    assert at["flaky"].job.state == common_pb2.JOB_STATE_FAILED
    assert [(h.attempt, h.error_code, h.response) for h in at["flaky"].job.history] == [
        (1, "503", "flaky is down")]
    assert at["flaky"].job.retry_at.seconds > 0
    assert at["held"].job.state == common_pb2.JOB_STATE_PENDING
    assert not at["held"].job.history
    assert "after" in at["late"].reason
    assert not at["late"].HasField("job")

    second = await sent.adm.stub.GetEvent(S.GetEventRequest(event_id=sent.events["m2"]),
                                          metadata=AUTH)
    at = {d.destination_id: d for d in second.destinations}
    assert at["flaky"].status == S.EVENT_STATUS_WAITING
    assert at["flaky"].waiting_behind_event_id == sent.events["m1"]
    assert at["flaky"].waiting_behind_job_id == first.destinations[0].job.job_id
    assert at["picky"].status == S.EVENT_STATUS_FILTERED_OUT
    assert "properties.n = 1" in at["picky"].reason
    assert at["ok"].status == S.EVENT_STATUS_DELIVERED

    third = await sent.adm.stub.GetEvent(S.GetEventRequest(event_id=sent.events["m3"]),
                                         metadata=AUTH)
    assert list(third.event.destination_ids) == ["ok"]
    at = {d.destination_id: d for d in third.destinations}
    assert at["ok"].status == S.EVENT_STATUS_DELIVERED
    for other in ("flaky", "picky", "held"):
        assert at[other].status == S.EVENT_STATUS_FILTERED_OUT
        assert at[other].reason == "the event named other destinations"


async def test_get_event_by_message_id_is_the_same_answer(sent: Sent) -> None:
    by_id = await sent.adm.stub.GetEvent(S.GetEventRequest(event_id=sent.events["m2"]),
                                         metadata=AUTH)
    by_message = await sent.adm.stub.GetEvent(
        S.GetEventRequest(source_id="web", message_id="m2"), metadata=AUTH)
    assert by_message == by_id


async def test_list_events_by_filter_and_page(sent: Sent) -> None:
    ids = sent.events
    stub = sent.adm.stub

    async def listed(text: str = "", **kw: Any) -> list[str]:
        answer = await stub.ListEvents(S.ListEventsRequest(source_id="web", filter=text, **kw),
                                       metadata=AUTH)
        return [e.message_id for e in answer.events]

    assert await listed() == ["m1", "m2", "m3"]
    assert await listed("user_id = 'u1'") == ["m1", "m2"]
    assert await listed("payload.properties.n = 1") == ["m1", "m3"]
    # The fields of connection and replay filters too: a replay's filter previews here.
    assert await listed("event = 'Order Completed' AND properties.n = 1 AND type = 'track'"
                        " AND anonymous_id IS NULL") == ["m1", "m3"]
    assert await listed(f"event_id > {ids['m1']} AND message_id LIKE 'm%'") == ["m2", "m3"]
    assert await listed("created_at > '2000-01-01' AND created_at < '2000-01-02'") == []
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListEvents(S.ListEventsRequest(source_id="web", page_size=2,
                                                         page_token=token), metadata=AUTH)
        assert len(page.events) <= 2
        seen += [e.message_id for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["m1", "m2", "m3"]
    first = await stub.ListEvents(S.ListEventsRequest(source_id="web", page_size=1),
                                  metadata=AUTH)
    assert not first.events[0].HasField("payload")
    with_payload = await stub.ListEvents(S.ListEventsRequest(
        source_id="web", filter="message_id = 'm3'", include_payload=True), metadata=AUTH)
    assert with_payload.events[0].payload["event"] == "Order Completed"
    assert list(with_payload.events[0].destination_ids) == []  # lists leave names out


async def test_a_tenant_token_sees_its_own_events_and_no_other_tenants(
        sent: Sent, world: World) -> None:
    own = Admin.auth(await factories.admin_token(world.conn, "acme"))
    await factories.tenant(world.conn, "beta")
    other = Admin.auth(await factories.admin_token(world.conn, "beta"))
    stub = sent.adm.stub
    got = await stub.GetEvent(S.GetEventRequest(source_id="web", message_id="m1"), metadata=own)
    assert got.event.event_id == sent.events["m1"]
    listed = await stub.ListEvents(S.ListEventsRequest(source_id="web"), metadata=own)
    assert len(listed.events) == 3
    for request in (S.GetEventRequest(event_id=sent.events["m1"]),
                    S.GetEventRequest(source_id="web", message_id="m1")):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetEvent(request, metadata=other)
        assert failure.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ListEvents(S.ListEventsRequest(source_id="web"), metadata=other)
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("method", "request_", "code", "says"), [
    ("GetEvent", S.GetEventRequest(), INVALID, "event_id: required"),
    ("GetEvent", S.GetEventRequest(event_id=-4), INVALID, "event_id: required"),
    ("GetEvent", S.GetEventRequest(event_id=1, source_id="web", message_id="m1"), INVALID,
     "not both"),
    ("GetEvent", S.GetEventRequest(message_id="m1"), INVALID, "source_id: required"),
    ("GetEvent", S.GetEventRequest(source_id="web"), INVALID, "message_id: required"),
    ("GetEvent", S.GetEventRequest(source_id="No Such", message_id="m1"), INVALID,
     "source_id: must be"),
    ("GetEvent", S.GetEventRequest(source_id="web", message_id="x" * 300), INVALID,
     "message_id: at most"),
    ("GetEvent", S.GetEventRequest(event_id=2**40), NOT_FOUND, f"event {2**40} not found"),
    ("GetEvent", S.GetEventRequest(source_id="web", message_id="nope"), NOT_FOUND,
     "no event with message id 'nope'"),
    ("GetEvent", S.GetEventRequest(source_id="nope", message_id="m1"), NOT_FOUND,
     "source 'nope' not found"),
    ("ListEvents", S.ListEventsRequest(), INVALID, "source_id: required"),
    ("ListEvents", S.ListEventsRequest(source_id="nope"), NOT_FOUND, "source 'nope' not found"),
    ("ListEvents", S.ListEventsRequest(source_id="web", filter="state = 'failed'"), INVALID,
     "filter: column 1: expected a field (event_id, user_id"),
    ("ListEvents", S.ListEventsRequest(source_id="web", filter="created_at > 'yesterday'"),
     INVALID, "filter: column 14: expected a date or time"),
    ("ListEvents", S.ListEventsRequest(source_id="web", filter="(user_id = 'u1'"), INVALID,
     "filter: column 16: expected"),
    ("ListEvents", S.ListEventsRequest(source_id="web", page_token="bm9wZQ=="), INVALID,
     "page_token: not a page token"),
    ("ListEvents", S.ListEventsRequest(source_id="web", page_size=1001), INVALID,
     "page_size: at most 1000"),
])
async def test_bad_input_is_refused_precisely(world: World, method: str, request_: Any,
                                              code: grpc.StatusCode, says: str) -> None:
    async with admin(world.database) as adm:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await getattr(adm.stub, method)(request_, metadata=AUTH)
    assert failure.value.code() is code
    assert says in (failure.value.details() or ""), failure.value.details()


async def test_get_stats_shows_the_log_to_the_operator_only(sent: Sent, world: World) -> None:
    stats = await sent.adm.stub.GetStats(S.GetStatsRequest(), metadata=AUTH)
    assert stats.event_log.events == 3
    assert stats.event_log.bytes > 0
    assert stats.event_log.oldest_event_id == sent.events["m1"]
    assert stats.event_log.oldest_event_at.seconds > 0
    own = Admin.auth(await factories.admin_token(world.conn, "acme"))
    scoped = await sent.adm.stub.GetStats(S.GetStatsRequest(), metadata=own)
    assert not scoped.HasField("event_log")
