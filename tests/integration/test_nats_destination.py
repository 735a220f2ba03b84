"""NATS JetStream destinations against a real NATS server: the one at 127.0.0.1:4222
(RELAYQ_TEST_NATS_URL), with a stream of its own per test, and private nats-server processes
for what the shared one cannot do (going away, TLS).

What arrives is read back from the stream itself, so order per user and "exactly once after
JetStream's de-duplication" are checked where a consumer would see them.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import grpc
import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import RawStreamMsg, StreamConfig
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from jobsdb import destinations
from jobsdb.catalog import Destination
from relayq import destination_types
from relayq.ports import free_port
from relayq.v1 import admin_pb2, ingest_pb2
from router_service.channels import GrpcChannels
from router_service.model import Job
from router_service.retry import Verdict
from router_service.senders import SenderContext
from router_service.senders.nats import NatsSender, event_name, token
from router_service.trust import Trust
from tests import factories
from tests.certs import self_signed
from tests.helpers import event, loopback_resolver
from tests.natsstreams import (
    NATS_URL,
    Stream,
    connected,
    made_stream,
    nats_destination,
    unique_names,
)
from tests.pipeline import World, send, states, wait_until_finished
from tests.poll import eventually, wait_until
from tests.services import Admin, admin, ingest, router, router_process

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
needs_nats_server = pytest.mark.skipif(not Path(NATS_SERVER).exists(),
                                       reason="needs the nats-server command")

# Ids a subject cannot carry as they are: separators, wildcards, spaces, '%', '$', non-ASCII,
# and the two spellings the encoding keeps apart ('_' is what an empty value becomes).
AWKWARD_USERS = ["alice", "bob.smith@example.com", "c *>", "%2E", "_", "$JS", "zoë", "user-7"]


def decode(value: str) -> str:
    """What a consumer does with a token from the subject (the README says so)."""
    return "" if value == "_" else unquote(value)


# --- the stream ------------------------------------------------------------------------------


@pytest.fixture
async def stream() -> AsyncIterator[Stream]:
    async with connected() as client, made_stream(client) as made:
        yield made


# --- reading what arrived ---------------------------------------------------------------------


def job_ids_by_user(messages: list[RawStreamMsg]) -> dict[str, list[int]]:
    """Job ids per user in stream order, the user read from the subject's last token (every
    subject template here ends with {user_id})."""
    by_user: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        assert message.headers is not None
        by_user[decode(message.subject.rsplit(".", 1)[1])].append(
            int(message.headers["X-Relayq-Job-Id"]))
    return dict(by_user)


def job_ids_of(messages: list[RawStreamMsg]) -> list[int]:
    return [int((m.headers or {})["X-Relayq-Job-Id"]) for m in messages]


def ingested_by_user(events: list[ingest_pb2.Event], ids: list[int]) -> dict[str, list[int]]:
    by_user: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(events, ids, strict=True):
        by_user[e.user_id].append(job_id)
    return dict(by_user)


async def error_codes(conn: AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(
        "SELECT DISTINCT error_code FROM job_statuses WHERE error_code IS NOT NULL"
        " AND error_code <> ''")
    return {row[0] for row in await cur.fetchall()}


async def failures(conn: AsyncConnection[Any], code: str) -> int:
    cur = await conn.execute("SELECT count(*) FROM job_statuses WHERE error_code = %s", (code,))
    return int((await cur.fetchone() or [0])[0])


async def wait_for_error(conn: AsyncConnection[Any], code: str, *, more_than: int = 0,
                         within: float = 30.0) -> None:
    """Until more than `more_than` attempts have failed with `code`."""
    async def failed() -> bool:
        return await failures(conn, code) > more_than

    async def described() -> str:
        return f"an attempt failed with {code!r} (errors: {await error_codes(conn)})"

    await eventually(failed, within=within, every=0.05, what=described)


# --- pure parts: endpoint, encoding, subjects ---------------------------------------------------


def test_an_endpoint_is_the_server_and_a_subject_template() -> None:
    parsed = destination_types.parse_nats("nats://u:p@nats.local/events.{tenant}.{user_id}")
    assert parsed.server == "nats://u:p@nats.local"
    assert not parsed.tls
    assert parsed.subject == ("events.", "tenant", ".", "user_id", "")
    secure = destination_types.parse_nats("tls://[::1]:4443/orders-{event}/x")
    assert (secure.server, secure.tls) == ("tls://[::1]:4443", True)
    assert secure.subject == ("orders-", "event", "/x")
    assert destination_types.parse_nats("nats://h/fixed.subject").subject == ("fixed.subject",)


@given(st.text())
def test_any_value_becomes_one_token_that_decodes_back(value: str) -> None:
    encoded = token(value)
    assert encoded
    assert all(c.isascii() and (c.isalnum() or c in "-_~%") for c in encoded), encoded
    assert decode(encoded) == value


def test_tokens_of_awkward_ids() -> None:
    assert [token(u) for u in AWKWARD_USERS] == [
        "alice", "bob%2Esmith%40example%2Ecom", "c%20%2A%3E", "%252E", "%5F", "%24JS",
        "zo%C3%AB", "user-7"]
    assert token("") == "_"


def test_the_event_name_comes_from_the_document() -> None:
    assert event_name('{"event": "Signed Up", "properties": {"event": "x"}}') == "Signed Up"
    assert event_name('{"type": "identify"}') == ""
    assert event_name('{"event": 7}') == ""
    assert event_name("[1]") == ""
    assert event_name("not json") == ""


# --- admin refuses what cannot work, precisely ------------------------------------------------

BAD_ENDPOINTS = [
    ("http://h/events", "a nats endpoint is a nats:// or tls:// (TLS) URL"),
    ("nats://", "a nats endpoint is a nats:// or tls:// (TLS) URL"),
    ("nats://h:4222", "names the subject after the server"),
    ("nats://h:4222/", "names the subject after the server"),
    ("nats://h:0/a", "invalid port"),
    ("nats://h:99999/a", "not a nats:// or tls:// URL"),
    ("nats://h/a?stream=X", "no query or fragment"),
    ("nats://h/a#b", "no query or fragment"),
    ("nats://h/a.{user}", "unknown placeholder {user}; known are {tenant}, {destination},"
                          " {user_id}, {event}"),
    ("nats://h/a.{user_id", "a brace that opens or closes no placeholder"),
    ("nats://h/a.user_id}", "a brace that opens or closes no placeholder"),
    ("nats://h/a.*", "'*' is not allowed (a wildcard, which cannot be published to)"),
    ("nats://h/a.>", "'>' is not allowed (a wildcard"),
    ("nats://h/a.x*y", "'*' is not allowed"),
    ("nats://h/a%2Eb", "'%' is not allowed (percent-encoding is relayq's own"),
    ("nats://h/caf\u00e9", "'\u00e9' is not allowed (subjects here are printable ASCII"),
    ("nats://h/a..b", "an empty token"),
    ("nats://h/.a", "an empty token"),
    ("nats://h/a.", "an empty token"),
    ("nats://h/$JS.API.STREAM.DELETE.x", "subjects starting with '$' are the NATS server's own"),
]


@pytest.fixture
async def admin_service(database: str) -> AsyncIterator[Admin]:
    async with admin(database) as running:
        await running.stub.CreateTenant(admin_pb2.CreateTenantRequest(id="acme"),
                                        metadata=Admin.auth())
        yield running


async def _destination_rows(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await conn.execute("SELECT id, type, endpoint, headers FROM destinations ORDER BY id")
    return await cur.fetchall()


async def test_admin_refuses_each_bad_endpoint_naming_why_and_changes_nothing(
        admin_service: Admin, conn: AsyncConnection[Any]) -> None:
    # One admin for every case: a database and a service per case cost seconds each.
    await admin_service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="bus", tenant_id="acme", type="nats", endpoint="nats://h/ok.{user_id}"),
        metadata=Admin.auth())
    before = await _destination_rows(conn)
    for endpoint, reason in BAD_ENDPOINTS:
        for request, method in [
            (admin_pb2.CreateDestinationRequest(id="new", tenant_id="acme", type="nats",
                                                endpoint=endpoint), "CreateDestination"),
            (admin_pb2.UpdateDestinationRequest(id="bus", endpoint=endpoint),
             "UpdateDestination"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await getattr(admin_service.stub, method)(request, metadata=Admin.auth())
            assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, endpoint)
            details = failure.value.details() or ""
            assert details.startswith("endpoint: "), (method, endpoint, details)
            assert reason in details, (method, endpoint, details)
    assert await _destination_rows(conn) == before


async def test_admin_takes_nats_endpoints_and_headers_but_not_nats_own_headers(
        admin_service: Admin, conn: AsyncConnection[Any]) -> None:
    created = await admin_service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="bus", tenant_id="acme", type="nats",
        endpoint="tls://nats.example.com:4443/events.{tenant}.{destination}.{event}.{user_id}",
        headers={"X-Api-Key": "k1"}), metadata=Admin.auth())
    assert created.type == "nats"
    assert dict(created.headers) == {"X-Api-Key": "k1"}  # names kept as given
    before = await _destination_rows(conn)
    for name in ("Nats-Msg-Id", "nats-expected-stream"):
        for request, method in [
            (admin_pb2.CreateDestinationRequest(id="new", tenant_id="acme", type="nats",
                                                endpoint="nats://h/a", headers={name: "x"}),
             "CreateDestination"),
            (admin_pb2.UpdateDestinationRequest(id="bus", headers={name: "x"}),
             "UpdateDestination"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await getattr(admin_service.stub, method)(request, metadata=Admin.auth())
            assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert failure.value.details() == (
                f"headers: header {name!r}: Nats-* headers steer JetStream itself (relayq sets"
                " Nats-Msg-Id; Nats-Expected-* would make publishes fail)")
    assert await _destination_rows(conn) == before


# --- through the router, to the stream ---------------------------------------------------------


async def test_every_event_reaches_the_stream_once_in_order_per_user(
        world: World, stream: Stream) -> None:
    await nats_destination(
        world, "bus", f"{NATS_URL}/{stream.prefix}.{{tenant}}.{{user_id}}", concurrency=16,
        headers=Jsonb({"X-Api-Key": "k1"}))
    events = [event(f"m{i}", AWKWARD_USERS[i % len(AWKWARD_USERS)], n=i) for i in range(400)]
    async with ingest(world.database) as service, router(world.database):
        ids = await send(service, world.source, events)
        await wait_until_finished(world.conn, len(ids))
    assert set((await states(world.conn)).values()) == {"succeeded"}
    messages = await stream.messages()
    assert len(messages) == len(ids)  # a PubAck for each, and nothing twice
    assert job_ids_by_user(messages) == ingested_by_user(events, ids)
    by_job = dict(zip(ids, events, strict=True))
    for message in messages:
        assert message.headers is not None
        job_id = int(message.headers["X-Relayq-Job-Id"])
        sent = by_job[job_id]
        prefix, tenant, user = message.subject.split(".")
        assert (prefix, tenant, decode(user)) == (stream.prefix, "acme", sent.user_id)
        body = json.loads(message.data)
        assert body["messageId"] == sent.message_id
        assert body["properties"] == json.loads(sent.payload_json)
        assert message.headers["Nats-Msg-Id"] == f"bus-{job_id}"
        assert message.headers["X-Relayq-Message-Id"] == sent.message_id
        assert message.headers["X-Relayq-Attempt"] == "1"
        assert message.headers["X-Api-Key"] == "k1"
        if sent.user_id.isascii():  # nats-py's reader hands others over as email Headers
            assert message.headers["X-Relayq-User-Id"] == sent.user_id


async def test_the_subject_can_carry_the_event_name_and_the_destination(
        world: World, stream: Stream) -> None:
    await nats_destination(
        world, "orders", f"{NATS_URL}/{stream.prefix}.{{destination}}.{{event}}.{{user_id}}")
    named = [ingest_pb2.Event(message_id=f"n{i}", user_id="u1", type="track", event=name)
             for i, name in enumerate(["Order Completed", "a.b", "_"])]
    anonymous = ingest_pb2.Event(message_id="i1", user_id="u1", type="identify")
    async with ingest(world.database) as service, router(world.database):
        ids = await send(service, world.source, [*named, anonymous])
        await wait_until_finished(world.conn, len(ids))
    subjects = [m.subject for m in await stream.messages()]
    assert subjects == [f"{stream.prefix}.orders.{e}.u1"
                        for e in ("Order%20Completed", "a%2Eb", "%5F", "_")]


async def test_a_missing_stream_is_retried_until_it_exists(world: World) -> None:
    async with connected() as client:
        name, prefix = unique_names()
        await nats_destination(world, "bus", f"{NATS_URL}/{prefix}.{{user_id}}")
        events = [event(f"m{i}", f"user-{i % 3}") for i in range(30)]
        async with ingest(world.database) as service, router(world.database):
            ids = await send(service, world.source, events)
            await wait_for_error(world.conn, "nats:no_stream")
            js = client.jetstream()
            await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
            try:
                await wait_until_finished(world.conn, len(ids))
                messages = await Stream(name, prefix, js).messages()
            finally:
                await js.delete_stream(name)
    assert set((await states(world.conn)).values()) == {"succeeded"}
    assert len(messages) == len(ids)
    assert job_ids_by_user(messages) == ingested_by_user(events, ids)
    cur = await world.conn.execute(
        "SELECT response FROM job_statuses WHERE error_code = 'nats:no_stream' LIMIT 1")
    row = await cur.fetchone()
    assert row is not None
    assert row[0].startswith(f"no JetStream stream captures subject '{prefix}.user-")


# --- the sender on its own: de-duplication, sizes -----------------------------------------------


async def _destination(conn: AsyncConnection[Any], endpoint: str, **columns: Any
                       ) -> Destination:
    """A destination row as the router loads it (so the test follows the schema)."""
    tenant = await factories.tenant(conn, f"t{secrets.token_hex(3)}")
    key = await factories.destination(conn, tenant, f"bus-{secrets.token_hex(3)}", kind="nats",
                                      endpoint=endpoint, timeout_ms=5000, **columns)
    row = (await destinations.load_all(conn))[key]
    return dataclasses.replace(row, id="bus")  # Nats-Msg-Id: "bus-<job id>"


def _job(job_id: int, user: str = "u1", attempt: int = 1, payload: str = '{"n": 1}') -> Job:
    return Job(job_id, user, f"m{job_id}", attempt, payload, datetime.now(UTC), None, 0)


@pytest.fixture
async def sender(conn: AsyncConnection[Any]) -> AsyncIterator[Any]:
    """Makes NatsSenders for endpoints (on destination rows in the test's database), the way
    the router does, and closes them after the test."""
    made: list[NatsSender] = []
    async with aiohttp.ClientSession() as http:
        trust = Trust()
        resolver = loopback_resolver()
        context = SenderContext(http=http, trust=trust, grpc_batch=100,
                                grpc_channels=GrpcChannels(trust.grpc_credentials, resolver),
                                resolver=resolver)

        async def make(endpoint: str) -> NatsSender:
            made.append(NatsSender(await _destination(conn, endpoint), context))
            return made[-1]

        try:
            yield make
        finally:
            for one in made:
                await one.close()


async def test_a_retry_whose_first_publish_was_stored_is_dropped_by_jetstream(
        stream: Stream, sender: Any) -> None:
    """A lost PubAck, as the router sees it: the attempt failed, so the job is published
    again with the same Nats-Msg-Id; JetStream acknowledges it and stores nothing new."""
    nats_sender = await sender(f"{NATS_URL}/{stream.prefix}.{{user_id}}")
    assert [r.verdict for r in await nats_sender.deliver([_job(7)])] == [Verdict.OK]
    again = await nats_sender.deliver([_job(7, attempt=2)])
    assert [r.verdict for r in again] == [Verdict.OK]
    assert [r.verdict for r in await nats_sender.deliver([_job(8)])] == [Verdict.OK]
    messages = await stream.messages()
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in messages] == ["bus-7", "bus-8"]
    assert (messages[0].headers or {})["X-Relayq-Attempt"] == "1"


async def test_a_batch_is_published_together_with_one_result_per_job(
        stream: Stream, sender: Any) -> None:
    jobs = [_job(100 + i, user=f"u{i}") for i in range(50)]
    nats_sender = await sender(f"{NATS_URL}/{stream.prefix}.{{user_id}}")
    assert nats_sender.max_batch > 1
    results = await nats_sender.deliver(jobs)
    assert [r.verdict for r in results] == [Verdict.OK] * 50
    stored = {(m.headers or {})["X-Relayq-Job-Id"] for m in await stream.messages()}
    assert stored == {str(j.job_id) for j in jobs}


async def test_messages_too_large_are_aborted_and_the_connection_lives_on(
        stream: Stream, sender: Any) -> None:
    async with connected() as client, made_stream(client, max_msg_size=1000) as small:
        max_payload = client.max_payload
        to_small = await sender(f"{NATS_URL}/{small.prefix}.{{user_id}}")
        to_big = await sender(f"{NATS_URL}/{stream.prefix}.{{user_id}}")
        over_stream = await to_small.deliver([_job(1, payload='"' + "x" * 2000 + '"')])
        # Over the server's max_payload, as the payload alone or only with the headers
        # (which would make the server drop the connection, were it sent).
        over_server = await to_big.deliver([
            _job(2, payload='"' + "x" * max_payload + '"'),
            _job(3, user="u2", payload='"' + "x" * (max_payload - 50) + '"')])
        fine = await to_big.deliver([_job(4), _job(5, user="u2")])
    assert [(r.verdict, r.error_code) for r in over_stream] == [
        (Verdict.ABORT, "nats:max_msg_size")]
    assert over_stream[0].response.startswith("stream refused 2002 bytes: message size exceeds")
    assert [(r.verdict, r.error_code) for r in over_server] == [
        (Verdict.ABORT, "nats:max_payload")] * 2
    assert f"exceed the server's max_payload of {max_payload}" in over_server[1].response
    assert [r.verdict for r in fine] == [Verdict.OK] * 2
    assert [(m.headers or {})["X-Relayq-Job-Id"] for m in await stream.messages()] == ["4", "5"]


async def test_an_endpoint_written_by_hand_fails_its_deliveries_naming_why(sender: Any) -> None:
    broken = await sender("nats://h/a.*")
    results = await broken.deliver([_job(1), _job(2, user="u2")])
    assert {(r.verdict, r.error_code) for r in results} == {(Verdict.RETRY, "config")}
    assert "'*' is not allowed" in results[0].response


# --- a NATS server of our own: going away and coming back, TLS ----------------------------------


class PrivateNats:
    """A nats-server process with JetStream, its store in `folder`, restartable in place."""

    def __init__(self, folder: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self.config = folder / "nats.conf"
        lines = [f'listen: "127.0.0.1:{self.port}"',
                 f'jetstream {{ store_dir: "{folder / "store"}" }}']
        if tls is not None:
            cert, key = tls
            lines.append(f'tls {{ cert_file: "{cert}", key_file: "{key}" }}')
        self.config.write_text("\n".join(lines) + "\n")
        self.log = folder / "nats.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([NATS_SERVER, "-c", str(self.config)],
                                            stdout=log, stderr=log)
        process = self.process

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, within=20, every=0.05,
                   what=lambda: f"nats-server listening: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """A clean shutdown (its store is flushed), as an operator's restart would be."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)
        self.process = None


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@needs_nats_server
async def test_a_server_down_at_first_and_restarted_later_gets_everything_once_in_order(
        world: World, private_nats: PrivateNats) -> None:
    url = f"nats://127.0.0.1:{private_nats.port}"
    name, prefix = unique_names()
    await nats_destination(world, "bus", f"{url}/{prefix}.{{user_id}}")
    first = [event(f"a{i}", f"user-{i % 4}") for i in range(40)]
    second = [event(f"b{i}", f"user-{i % 4}") for i in range(40)]
    async with ingest(world.database) as service, router(world.database):
        ids = await send(service, world.source, first)
        await wait_for_error(world.conn, "connection")  # nothing listens yet
        private_nats.start()
        async with connected(url) as client:
            await client.jetstream().add_stream(
                StreamConfig(name=name, subjects=[f"{prefix}.>"]))
        await wait_until_finished(world.conn, len(ids))
        # The server restarts while more events wait: the router's connection comes back.
        private_nats.stop()
        before = await failures(world.conn, "connection")
        ids += await send(service, world.source, second)
        await wait_for_error(world.conn, "connection", more_than=before)
        private_nats.start()
        await wait_until_finished(world.conn, len(ids))
        async with connected(url) as client:
            messages = await Stream(name, prefix, client.jetstream()).messages()
    assert len(messages) == len(ids)
    assert job_ids_by_user(messages) == ingested_by_user(first + second, ids)


@needs_nats_server
async def test_tls_endpoints_publish_over_tls_only(
        world: World, stream: Stream, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = PrivateNats(tmp_path, tls=(cert, key))
    server.start()
    try:
        url = f"tls://localhost:{server.port}"
        name, prefix = unique_names()
        client = await nats.connect(url, tls=ssl.create_default_context(cafile=str(cert)),
                                    connect_timeout=2, allow_reconnect=False)
        try:
            js = client.jetstream()
            await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
            await nats_destination(world, "secure", f"{url}/{prefix}.{{user_id}}")
            # tls:// to a server that does not use TLS (the shared one): nothing is sent.
            await nats_destination(world, "downgraded",
                                   f"{NATS_URL.replace('nats://', 'tls://')}/"
                                   f"{stream.prefix}.{{user_id}}")
            events = [event(f"m{i}", f"user-{i % 2}") for i in range(10)]
            async with ingest(world.database) as service, \
                    router(world.database, RELAYQ_DESTINATION_CA_FILE=str(cert)):
                ids = await send(service, world.source, events)
                await wait_for_error(world.conn, "tls")
                # Only the secure destination's half can finish (the other retries for hours).
                await wait_until_finished(world.conn, len(ids) // 2)
            messages = await Stream(name, prefix, js).messages()
            await js.delete_stream(name)
        finally:
            await client.close()
    finally:
        server.stop()
    assert len(messages) == len(events)
    assert await stream.count() == 0
    cur = await world.conn.execute(
        "SELECT DISTINCT s.response FROM job_statuses s JOIN jobs j USING (job_id)"
        " JOIN destinations d USING (destination_key) WHERE d.id = 'downgraded'"
        " AND s.error_code = 'tls'")
    assert [r[0] for r in await cur.fetchall()] == [
        f"{NATS_URL.replace('nats://', 'tls://')} does not use TLS; a tls:// endpoint publishes"
        " only over TLS"]


# --- a router killed mid-delivery ---------------------------------------------------------------


@pytest.mark.process
async def test_kill_9_mid_delivery_leaves_every_event_once_in_order_at_the_stream(
        world: World, stream: Stream, database: str) -> None:
    """The killed router published jobs it never recorded; the next one publishes them again
    with the same Nats-Msg-Id, and JetStream's duplicate window drops them.

    So that the case is certain, not a matter of timing, the test holds a lock that keeps the
    first router's outcome writes waiting: everything it publishes is unrecorded when it dies.
    """
    # The rate limit counts deliver() calls, batches of up to `concurrency` jobs here: some
    # 200 jobs/s, so the kill finds the router mid-way.
    await nats_destination(world, "bus", f"{NATS_URL}/{stream.prefix}.{{user_id}}",
                           concurrency=4, rate_per_second=50, rate_burst=5)
    events = [event(f"m{i}", f"user-{i % 20}") for i in range(900)]
    async with ingest(world.database) as service:
        ids = await send(service, world.source, events)
    async with await AsyncConnection.connect(database) as blocker:
        await blocker.execute("LOCK TABLE deliveries IN SHARE MODE")
        first = router_process(world.database)
        try:
            await stream.wait_for(150)
            first.kill()
        finally:
            first.close()
        # The dead router's session may still wait for the lock: end it, or it would write
        # its outcomes once the lock goes.
        await world.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> ALL(%s)",
            ([world.conn.info.backend_pid, blocker.info.backend_pid],))
        await blocker.rollback()
    published = job_ids_of(await stream.messages())
    assert 150 <= len(published) < len(ids)
    assert set((await states(world.conn)).values()) == {"pending"}  # none recorded
    second = router_process(world.database)
    try:
        await wait_until_finished(world.conn, len(ids))
    finally:
        second.close()
    messages = await stream.messages()
    assert len(messages) == len(ids)
    assert job_ids_of(messages)[:len(published)] == published
    assert job_ids_by_user(messages) == ingested_by_user(events, ids)
