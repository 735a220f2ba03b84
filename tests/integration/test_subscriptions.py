"""Subscriptions: a connection's filter decides which of a source's events its destination gets.

End to end with a real ingest, router, admin and webhook receiver; and, on random events and
random filters, the routers' evaluation checked against the SQL that job filters compile to,
run by Postgres on the same documents (operators' job queries ask connections' filters that
way: jobsdb.subscriptions).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import AsyncConnection, sql

from filterlang.events import compile_event_filter
from jobsdb import destinations, jobs
from jobsdb.filters import compile_filter
from relayq.v1 import admin_pb2, ingest_pb2
from router_service import metrics as router_metrics
from router_service.routing import Routing
from tests import factories
from tests.databases import SERVER_DSN, drop_database, dsn_for
from tests.helpers import auth
from tests.pipeline import World, wait_until_finished
from tests.poll import eventually
from tests.services import Admin, admin, ingest, router

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# ---------------------------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------------------------

# destination -> (its connection's filter, the same rule written by hand in Python)
SUBSCRIPTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "everything": ("", lambda e: True),
    "orders": ("event = 'Order Completed'", lambda e: e["event"] == "Order Completed"),
    "big": ("properties.revenue >= 100 AND NOT properties.test = TRUE",
            lambda e: e["revenue"] is not None and e["revenue"] >= 100 and not e["test"]),
    "nobody": ("event = 'Never Sent'", lambda e: False),
}
NAMES = ["Order Completed", "Signed Up", "Page Viewed"]


def _events(count: int, prefix: str = "m") -> list[dict[str, Any]]:
    """Varied events: names in turn, revenue missing on every fifth, some test events."""
    return [{"message_id": f"{prefix}{i}", "user": f"u{i % 4}", "event": NAMES[i % 3],
             "revenue": None if i % 5 == 0 else (i * 37) % 250, "test": i % 7 == 0}
            for i in range(count)]


def _proto(e: dict[str, Any], **extra: Any) -> ingest_pb2.Event:
    body: dict[str, Any] = {"test": e["test"]}
    if e["revenue"] is not None:
        body["revenue"] = e["revenue"]
    return ingest_pb2.Event(message_id=e["message_id"], user_id=e["user"], type="track",
                            event=e["event"], payload_json=json.dumps(body), **extra)


async def _ingest(service: Any, write_key: str, events: list[ingest_pb2.Event]
                  ) -> ingest_pb2.IngestResponse:
    response: ingest_pb2.IngestResponse = await service.stub.Ingest(
        ingest_pb2.IngestRequest(events=events), metadata=auth(write_key), timeout=10)
    return response


async def _delivered_by_destination(world: World) -> dict[str, set[str]]:
    """What each destination's webhook received (its jobs' ids name the connection)."""
    cur = await world.conn.execute(
        "SELECT c.slot, d.id FROM connections c JOIN destinations d USING (destination_key)"
        " WHERE c.source_key = %s", (world.source.key,))
    by_slot = dict(await cur.fetchall())
    found: dict[str, set[str]] = defaultdict(set)
    for delivery in world.webhook.oks:
        found[by_slot[delivery.job_id & 0xFFFF]].add(delivery.message_id)
    return dict(found)


async def _subscribe(adm: Admin, source: str = "web") -> None:
    for destination, (text, _) in SUBSCRIPTIONS.items():
        await adm.stub.UpdateConnection(admin_pb2.UpdateConnectionRequest(
            source_id=source, destination_id=destination, filter=text), metadata=Admin.auth())


def _filtered_metric(destination: str) -> float:
    return router_metrics.FILTERED.labels(destination)._value.get()


async def test_a_filtered_connection_delivers_only_matching_events(world: World) -> None:
    """Ingest writes each event once, whatever the filters; the router reading it gives each
    destination the events its connection's filter takes, and counts what it kept out."""
    for destination in SUBSCRIPTIONS:
        await world.destination(destination)
    sent = _events(60)
    expected = {d: {e["message_id"] for e in sent if rule(e)}
                for d, (_, rule) in SUBSCRIPTIONS.items()}
    assert all(0 < len(expected[d]) < len(sent) for d in ("orders", "big"))
    metric_before = {d: _filtered_metric(d) for d in SUBSCRIPTIONS}
    kept_out = {d: len(sent) - len(ids) for d, ids in expected.items()}

    async with admin(world.database) as adm:
        await _subscribe(adm)
        async with ingest(world.database) as service, router(world.database):
            response = await _ingest(service, world.source.write_key, [_proto(e) for e in sent])
            wanted = sum(len(ids) for ids in expected.values())
            await world.webhook.wait_for(lambda: len(world.webhook.oks) >= wanted)
            await wait_until_finished(world.conn, wanted)

            # Ingest answers before any filter is asked: every event is addressed to the
            # four connections, and stored once.
            assert [(r.status, r.destinations, list(r.job_ids), r.filtered_out)
                    for r in response.results] == [
                (ingest_pb2.EventResult.ACCEPTED, len(SUBSCRIPTIONS), [], 0)] * len(sent)
            cur = await world.conn.execute("SELECT count(*) FROM events")
            assert await cur.fetchone() == (len(sent),)

            delivered = await _delivered_by_destination(world)
            assert {d: delivered.get(d, set()) for d in SUBSCRIPTIONS} == expected
            assert len(world.webhook.oks) == wanted  # each exactly once

            # Counted per connection, by the router that read them: in GetStats and its
            # metric. A retried batch (all duplicates) is not stored or counted again.
            again = await _ingest(service, world.source.write_key, [_proto(e) for e in sent])
            assert again.duplicates == len(sent)

            async def counted() -> admin_pb2.GetStatsResponse | None:
                stats = await adm.stub.GetStats(admin_pb2.GetStatsRequest(),
                                                metadata=Admin.auth())
                done = {d.destination_id: d.filtered_out for d in stats.destinations}
                return stats if done == kept_out else None

            stats = await eventually(counted, what="the filtered events counted")
    assert [(c.source_id, c.destination_id, c.tenant_id, c.filter, c.filtered_out)
            for c in stats.connections] == [
        ("web", d, "acme", SUBSCRIPTIONS[d][0], kept_out[d])
        for d in sorted(SUBSCRIPTIONS) if d != "everything"]
    assert all(c.filtered_out_per_second == c.filtered_out / 60 for c in stats.connections)
    assert [t.filtered_out for t in stats.tenants] == [sum(kept_out.values())]
    assert {d: _filtered_metric(d) - metric_before[d] for d in SUBSCRIPTIONS} == kept_out


async def test_filters_apply_to_named_destinations_and_to_events_no_one_wants(
        world: World) -> None:
    for destination in SUBSCRIPTIONS:
        await world.destination(destination)
    filters = {"orders": "event = 'Order Completed'", "big": "event = 'Signed Up'",
               "everything": "event = 'Never Sent'", "nobody": "event = 'Never Sent'"}
    for destination, text in filters.items():
        await world.conn.execute(
            "UPDATE connections SET event_filter = %s WHERE destination_key ="
            " (SELECT destination_key FROM destinations WHERE id = %s)", (text, destination))
    async with ingest(world.database) as service, router(world.database) as relay:
        first = await _ingest(service, world.source.write_key, [
            ingest_pb2.Event(message_id="named", user_id="u", event="Signed Up",
                             destination_ids=["orders", "big"]),
            ingest_pb2.Event(message_id="unwanted", user_id="u", event="Signed Up",
                             destination_ids=["orders"]),
            ingest_pb2.Event(message_id="nowhere", user_id="u", event="Page Viewed")])
        # An event no connection takes is still accepted; ingest counts the destinations
        # it is addressed to.
        assert [(r.status, r.destinations) for r in first.results] == [
            (ingest_pb2.EventResult.ACCEPTED, 2), (ingest_pb2.EventResult.ACCEPTED, 1),
            (ingest_pb2.EventResult.ACCEPTED, 4)]
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1)
        # Its message id is claimed: a retry is a duplicate, and counts nothing again.
        retry = await _ingest(service, world.source.write_key, [
            ingest_pb2.Event(message_id="unwanted", user_id="u", event="Order Completed"),
            ingest_pb2.Event(message_id="nowhere", user_id="u", event="Signed Up")])
        assert [r.status for r in retry.results] == [ingest_pb2.EventResult.DUPLICATE] * 2
        engine = relay.app.engine
        assert engine is not None
        await engine.cursors.write()
    # Naming destinations narrows what the connections' filters let through, never widens it.
    assert await _delivered_by_destination(world) == {"big": {"named"}}
    cur = await world.conn.execute(
        "SELECT d.id, sum(n.filtered)::int FROM connection_counts n"
        " JOIN destinations d USING (destination_key) GROUP BY d.id")
    assert dict(await cur.fetchall()) == {"orders": 3, "big": 1, "everything": 1, "nobody": 1}


async def test_a_filter_on_the_events_context(world: World) -> None:
    """context_json travels beside the properties; a filter reads it like them."""
    await world.destination("ios")
    await world.conn.execute("UPDATE connections SET event_filter = %s",
                             ("context.app.platform = 'ios'",))
    async with ingest(world.database) as service, router(world.database):
        await _ingest(service, world.source.write_key, [
            ingest_pb2.Event(message_id=f"m{n}", user_id="u", event="Opened",
                             context_json=json.dumps({"app": {"platform": platform}}))
            for n, platform in enumerate(["ios", "android", "ios"])] + [
            ingest_pb2.Event(message_id="none", user_id="u", event="Opened"),
            ingest_pb2.Event(message_id="last", user_id="u", event="Opened",
                             context_json=json.dumps({"app": {"platform": "ios"}}))])
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 3)
    assert [d.message_id for d in world.webhook.oks] == ["m0", "m2", "last"]


async def test_a_filter_changed_mid_stream_applies_from_the_routers_read_on(
        world: World) -> None:
    """Filters apply when a router reads an event: a change reaches the running router, and
    applies to the events it reads from then on (what it read before keeps the old
    decision; a backfill is how a connection gets past events again)."""
    await world.destination("orders")
    async with admin(world.database) as adm, ingest(world.database) as service, \
            router(world.database):
        await _ingest(service, world.source.write_key, [ingest_pb2.Event(
            message_id="s0", user_id="u", event="Signed Up")])
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1)
        await adm.stub.UpdateConnection(admin_pb2.UpdateConnectionRequest(
            source_id="web", destination_id="orders", filter="event = 'Order Completed'"),
            metadata=Admin.auth())
        attempts = itertools.count(1)

        async def filter_applied() -> bool:
            # A sign-up and an order of the same user: once the order arrives, the sign-up
            # before it was either delivered (read before the change) or filtered.
            attempt = next(attempts)
            await _ingest(service, world.source.write_key, [
                ingest_pb2.Event(message_id=f"s{attempt}", user_id="u", event="Signed Up"),
                ingest_pb2.Event(message_id=f"o{attempt}", user_id="u",
                                 event="Order Completed")])
            await world.webhook.wait_for(
                lambda: any(d.message_id == f"o{attempt}" for d in world.webhook.oks))
            return not any(d.message_id == f"s{attempt}" for d in world.webhook.oks)

        await eventually(filter_applied, within=10, every=0, what="the filter to apply")
        # From then on, every sign-up is kept out and every order delivered, in order.
        await _ingest(service, world.source.write_key, [
            ingest_pb2.Event(message_id=f"x{i}", user_id="u",
                             event="Signed Up" if i % 2 else "Order Completed")
            for i in range(6)])
        await world.webhook.wait_for(
            lambda: [d.message_id for d in world.webhook.oks][-3:] == ["x0", "x2", "x4"])
    received = [d.message_id for d in world.webhook.oks]
    assert received[0] == "s0"
    assert not {"x1", "x3", "x5"} & set(received)


# ---------------------------------------------------------------------------------------------
# Admin: connect and update with filters; bad filters refused with their position.
# ---------------------------------------------------------------------------------------------


async def _connection_rows(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await conn.execute(
        "SELECT source_key, destination_key, enabled, event_filter FROM connections"
        " ORDER BY source_key, destination_key")
    return await cur.fetchall()


BAD_FILTERS = [
    ("event = 'Order Completed", "filter: column 9: expected a closing ' for the string that"
                                 " starts here, found end of filter"),
    ("payload.event = 'x'", "filter: column 1: expected a field (type, event, user_id,"
                            " anonymous_id, properties.<key> or context.<key>), found 'payload'"),
    ("properties.revenue >= '100' AND properties.vip > TRUE",
     "filter: column 48: expected an operator for properties.vip (=, !=, IN, NOT IN) to"
     " compare with TRUE or FALSE, found '>'"),
    ("type IN ('track', 5)", "filter: column 19: expected a quoted string for type, found '5'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILTERS)
async def test_a_bad_filter_is_refused_with_its_position_and_changes_nothing(
        world: World, text: str, message: str) -> None:
    await world.destination("hook")
    await factories.destination(world.conn, world.tenant, "other")
    before = await _connection_rows(world.conn)
    async with admin(world.database) as adm:
        for call, request in (
                (adm.stub.ConnectSource, admin_pb2.ConnectSourceRequest(
                    source_id="web", destination_id="other", filter=text)),
                (adm.stub.ConnectSource, admin_pb2.ConnectSourceRequest(
                    source_id="web", destination_id="hook", filter=text)),
                (adm.stub.UpdateConnection, admin_pb2.UpdateConnectionRequest(
                    source_id="web", destination_id="hook", filter=text))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(request, metadata=Admin.auth())
            assert (refused.value.code(), refused.value.details()) == (INVALID, message)
    assert await _connection_rows(world.conn) == before


async def test_connect_update_and_list_show_the_filter(world: World) -> None:
    await factories.destination(world.conn, world.tenant, "hook")
    auth_ = Admin.auth()
    async with admin(world.database) as adm:
        stub = adm.stub

        async def connect(**kwargs: Any) -> admin_pb2.Connection:
            answer: admin_pb2.Connection = await stub.ConnectSource(
                admin_pb2.ConnectSourceRequest(source_id="web", destination_id="hook",
                                               **kwargs), metadata=auth_)
            return answer

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.UpdateConnection(admin_pb2.UpdateConnectionRequest(
                source_id="web", destination_id="hook", filter="type = 'track'"),
                metadata=auth_)
        assert (missing.value.code(), missing.value.details()) == (
            NOT_FOUND, "connection 'web' -> 'hook' not found")

        assert (await connect()).filter == ""
        assert (await connect(filter="event = 'A'")).filter == "event = 'A'"
        # Connecting again without a filter keeps it; so do disconnecting and reconnecting.
        assert (await connect()).filter == "event = 'A'"
        await stub.DisconnectSource(admin_pb2.DisconnectSourceRequest(
            source_id="web", destination_id="hook"), metadata=auth_)
        reconnected = await connect()
        assert (reconnected.enabled, reconnected.filter) == (True, "event = 'A'")
        updated = await stub.UpdateConnection(admin_pb2.UpdateConnectionRequest(
            source_id="web", destination_id="hook", filter="properties.n > 1"), metadata=auth_)
        assert updated.filter == "properties.n > 1"
        unchanged = await stub.UpdateConnection(admin_pb2.UpdateConnectionRequest(
            source_id="web", destination_id="hook"), metadata=auth_)
        assert unchanged.filter == "properties.n > 1"
        listed = await stub.ListConnections(admin_pb2.ListConnectionsRequest(), metadata=auth_)
        assert [(c.destination_id, c.filter) for c in listed.connections] == [
            ("hook", "properties.n > 1")]
        # "" (or blanks) clears it, stored as NULL: every event.
        assert (await connect(filter="   ")).filter == ""
    assert [row[3] for row in await _connection_rows(world.conn)] == [None]


async def test_a_stored_filter_that_no_longer_compiles_takes_no_event(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Only another version of relayq could have stored it; the connection must not start
    taking every event because of that."""
    key = await world.destination("hook")
    await world.conn.execute("UPDATE connections SET event_filter = 'version = 2'")
    routes = Routing(await destinations.load_connections(world.conn))
    (route,) = routes.routes(world.source.key)
    assert route.destination_key == key
    assert route.filter is not None
    assert not route.filter.matches({"type": "track", "properties": {}})
    assert "connection filter does not compile" in caplog.text


# ---------------------------------------------------------------------------------------------
# The property: ingest's evaluation agrees with Postgres on the job-filter SQL.
# ---------------------------------------------------------------------------------------------
#
# Documents come first; filters are then drawn mostly from what the documents hold (their
# paths, array indexes counted from either end, and Postgres's own text form of every value
# in them as literals), so that comparisons hit and tie often enough to tell two evaluations
# apart, plus random paths and literals for the misses.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle() -> Iterator[psycopg.Connection[Any]]:
    """A scratch database whose text compares by code point (the C collation), as connection
    filters define ordering, holding one table of event documents."""
    name = f"relayq_oracle_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(SERVER_DSN, autocommit=True) as admin_conn:
        admin_conn.execute(sql.SQL(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        ).format(sql.Identifier(name)))
    try:
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            conn.execute("CREATE TABLE events (id integer PRIMARY KEY, payload jsonb NOT NULL)")
            yield conn
    finally:
        drop_database(name)


_KEYS = ["a", "b", "0", "1", "-1", "x y"]
_CHARS = "ab_%\\' é10"
_text = st.text(st.sampled_from(_CHARS), max_size=4)
_decimal = st.integers(-100_000, 100_000).map(lambda n: n / 1000)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-20, 20),
                    st.integers(-(2**53), 2**53), _decimal, _text,
                    # Floats whose shortest spelling is not how numeric prints them.
                    st.sampled_from([1e16, 1.5e-7, -2.5e-5, 1e21, -0.0, 0.1, 100.0]),
                    st.sampled_from(["10", "1.5", "true", "null", "[1, 2]"]))
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3), max_leaves=6)
_object = st.dictionaries(st.sampled_from(_KEYS), _json, max_size=4)

_documents = st.fixed_dictionaries(
    {"messageId": st.just("m"), "properties": _object},
    optional={"type": _text, "event": _text, "userId": _text, "anonymousId": _text,
              "context": _object})

# (the field in a connection filter, the same field in a job filter over the document)
_TEXT_FIELDS = {"type": "payload.type", "event": "payload.event", "user_id": "payload.userId",
                "anonymous_id": "payload.anonymousId"}


def _quote(text: str, quote: str = "'") -> str:
    return quote + text.replace(quote, quote * 2) + quote


def _key(key: str) -> str:
    return key if key.isascii() and key.isalnum() else _quote(key, '"')


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every path into a JSON value; an array element both by its index and from the end."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            for segment in (str(index), str(index - len(value))):
                yield (*prefix, segment)
                yield from _paths(inner, (*prefix, segment))


def _like_pattern(text: str) -> str:
    trailing = len(text) - len(text.rstrip("\\"))
    return text + "a" if trailing % 2 else text


@st.composite
def _pattern(draw: st.DrawFn, seen: list[str]) -> str:
    """A LIKE pattern: a value from the documents with one character replaced by _ or a slice
    by % (so it may match), or random characters."""
    if seen and draw(st.booleans()):
        text = draw(st.sampled_from(seen))
        start = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and start < len(text):
            text = text[:start] + "_" + text[start + 1:]
        else:
            end = draw(st.integers(start, len(text)))
            text = text[:start] + draw(st.sampled_from(["%", "", "%%"])) + text[end:]
    else:
        text = draw(st.text(st.sampled_from(_CHARS + "%"), max_size=5))
    return _like_pattern(text)


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


@st.composite
def _condition(draw: st.DrawFn, seen: list[str], numbers: list[str], here: list[str],
               text_only: bool) -> str:
    """A condition on a field; `here` holds Postgres's text form of the field's value in
    each document that has it: half the time the literals come from there (as a string, and
    as a number or boolean where the text is one), so that comparisons tie."""
    known = here or seen
    strings = st.sampled_from(known).map(_quote) | _text.map(_quote) if known else \
        _text.map(_quote)
    number = (st.sampled_from(numbers) if numbers else st.nothing()) | st.integers(-20, 20).map(
        str) | _decimal.map(repr) | st.sampled_from(["0", "1", "1.50", "0.000",
                                                     "9007199254740993"])
    boolean = st.sampled_from(["TRUE", "false"])
    if here and draw(st.booleans()):
        numbers_here = [t for t in here if _NUMBER.fullmatch(t)]
        booleans_here = [t.upper() for t in here if t in ("true", "false")]
        strings = st.sampled_from(here).map(_quote)
        number = st.sampled_from(numbers_here) if numbers_here else number
        boolean = st.sampled_from(booleans_here) if booleans_here else boolean
    kinds = [strings] if text_only else [strings, number, boolean]
    kind = draw(st.sampled_from(range(len(kinds))))
    literal = kinds[kind]
    shape = draw(st.sampled_from(["compare", "compare", "in", "like", "null"]))
    if shape == "like":
        negated = draw(st.booleans())
        return f"{'NOT LIKE' if negated else 'LIKE'} {_quote(draw(_pattern(known)))}"
    if shape == "null":
        return draw(st.sampled_from(["IS NULL", "IS NOT NULL"]))
    if shape == "in":
        values = draw(st.lists(literal, min_size=1, max_size=3))
        return f"{'NOT IN' if draw(st.booleans()) else 'IN'} ({', '.join(values)})"
    ops = ["=", "!=", "<>"] if kind == 2 else ["=", "!=", "<>", "<", "<=", ">", ">="]
    return f"{draw(st.sampled_from(ops))} {draw(literal)}"


@dataclass(frozen=True)
class _Held:
    """What the documents of one example hold, for drawing filters that hit."""

    # Paths into properties and context, ("properties", "a", "-1").
    paths: list[tuple[str, ...]]
    # Postgres's text form of every value, and of every number.
    seen: list[str]
    numbers: list[str]
    # Document path (text fields as their envelope key) -> the text forms found there.
    at: dict[tuple[str, ...], list[str]]


@st.composite
def _predicate(draw: st.DrawFn, held: _Held) -> tuple[str, str]:
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(_TEXT_FIELDS)))
        key = _TEXT_FIELDS[name].removeprefix("payload.")
        condition = draw(_condition(held.seen, held.numbers, held.at.get((key,), []),
                                    text_only=True))
        return f"{name} {condition}", f"{_TEXT_FIELDS[name]} {condition}"
    random_path = st.tuples(st.sampled_from(["properties", "context"]),
                            st.lists(st.sampled_from(_KEYS), min_size=1, max_size=3)).map(
        lambda rp: (rp[0], *rp[1]))
    path = draw(st.sampled_from(held.paths) | random_path if held.paths else random_path)
    field = path[0] + "." + ".".join(_key(k) for k in path[1:])
    condition = draw(_condition(held.seen, held.numbers, held.at.get(path, []),
                                text_only=False))
    return f"{field} {condition}", f"payload.{field} {condition}"


@st.composite
def _filters(draw: st.DrawFn, held: _Held, depth: int = 0) -> tuple[str, str]:
    """A connection filter and the same filter as a job filter on the event's document."""
    shape = draw(st.sampled_from(["leaf", "leaf", "and", "or", "not"]))
    if depth >= 3 or shape == "leaf":
        return draw(_predicate(held))
    if shape == "not":
        event_text, job_text = draw(_filters(held, depth + 1))
        return f"NOT ({event_text})", f"NOT ({job_text})"
    joiner = " AND " if shape == "and" else " OR "
    left, right = draw(_filters(held, depth + 1)), draw(_filters(held, depth + 1))
    return f"({left[0]}{joiner}{right[0]})", f"({left[1]}{joiner}{right[1]})"


def _held(conn: psycopg.Connection[Any], parsed: list[dict[str, Any]]) -> _Held:
    rows = conn.execute(
        "SELECT DISTINCT v #>> '{}', jsonb_typeof(v) = 'number'"
        " FROM events, jsonb_path_query(payload, 'lax $.**') v"
        " WHERE jsonb_typeof(v) <> 'null' ORDER BY 1").fetchall()
    paths = sorted({(root, *path) for event in parsed for root in ("properties", "context")
                    for path in _paths(event.get(root, {}))})
    lookups = [*paths, *((key,) for key in ("type", "event", "userId", "anonymousId"))]
    found = conn.execute(
        "SELECT DISTINCT p.ordinality, e.payload #>> p.path FROM events e,"
        " (SELECT ARRAY(SELECT jsonb_array_elements_text(value)) AS path, ordinality"
        "  FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY) p"
        " WHERE e.payload #>> p.path IS NOT NULL ORDER BY 1, 2",
        (json.dumps(lookups),)).fetchall()
    at: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for ordinality, text in found:
        at[lookups[ordinality - 1]].append(text)
    return _Held(paths, [t for t, _ in rows if len(t) <= 200], [t for t, n in rows if n],
                 dict(at))


def _selected_by_postgres(conn: psycopg.Connection[Any], job_filter: str) -> set[int]:
    compiled = compile_filter(job_filter)
    assert compiled is not None
    statement = sql.SQL("SELECT id FROM events j WHERE {}").format(compiled.where)
    return {row[0] for row in conn.execute(statement, compiled.params).fetchall()}


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(documents=st.lists(_documents, min_size=1, max_size=8), data=st.data())
def test_ingest_evaluates_filters_as_postgres_does(
        oracle: psycopg.Connection[Any], documents: list[dict[str, Any]],
        data: st.DataObject) -> None:
    texts = [json.dumps(d) for d in documents]
    with oracle.transaction():
        oracle.execute("TRUNCATE events")
        with oracle.cursor() as cur:
            cur.executemany("INSERT INTO events (id, payload) VALUES (%s, %s::jsonb)",
                            list(enumerate(texts)))
    # As ingest sees an event: the envelope and the object orjson parsed from its text.
    parsed = [orjson.loads(t) for t in texts]
    pairs = data.draw(st.lists(_filters(_held(oracle, parsed)), min_size=1, max_size=4))
    for event_filter, job_filter in pairs:
        compiled = compile_event_filter(event_filter)
        assert compiled is not None
        matched = {i for i, event in enumerate(parsed) if compiled.matches(event)}
        assert matched == _selected_by_postgres(oracle, job_filter), (event_filter, texts)


async def test_maintenance_folds_old_counts_and_stats_keep_the_sum(world: World) -> None:
    key = await world.destination("hook")
    await world.conn.execute("UPDATE connections SET event_filter = 'type = ''x'''")
    # (seconds ago, or None for the folded row; backend; events kept out)
    for ago, backend, filtered in [(None, 0, 5), (1200, 111, 3), (1800, 222, 4), (10, 111, 2)]:
        await world.conn.execute(
            "INSERT INTO connection_counts VALUES (%s, %s, CASE WHEN %s::integer IS NULL"
            " THEN '-infinity' ELSE now() - make_interval(secs => %s) END, %s, %s)",
            (world.source.key, key, ago, ago, backend, filtered))
    await jobs.fold_counts(world.conn)
    cur = await world.conn.execute(
        "SELECT bucket = '-infinity', backend, filtered FROM connection_counts ORDER BY 1, 2")
    assert await cur.fetchall() == [(False, 111, 2), (True, 0, 12)]
    [row] = await jobs.connection_stats(world.conn, tenant_key=None, destination_key=None)
    assert (row.filtered_out, row.recent_filtered_out, row.filter) == (14, 2, "type = 'x'")
