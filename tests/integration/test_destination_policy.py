"""Destinations reach only where they may (relayq.netpolicy, router_service.resolver): every
destination type, every form an address can be written in, checked at every attempt.

These tests send traffic only to this machine. A refused case is shown refused *before* any
connection: names resolve through a stub resolver (test names mapped to refused addresses;
nothing asks DNS), and every connection the process tries is recorded by a guard that lets
only loopback through (asyncio's create_connection, which the webhook client and nats-py use,
and gRPC channel creation, where gRPC's own connections start). So a leak would show as a
recorded attempt, refused by the guard, never as traffic to another address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats
import pytest
from aiohttp import web
from nats.js.api import StreamConfig

from relayq import netpolicy
from relayq.netpolicy import NetworkPolicy
from relayq.v1 import admin_pb2
from router_service import resolver
from tests import factories
from tests.helpers import LOOPBACK_NETWORKS, event
from tests.pipeline import World, send, states, wait_until_finished
from tests.services import Admin, admin, ingest, router
from tests.sinks import serve_post

NATS_URL = os.environ.get("RELAYQ_TEST_NATS_URL", "nats://127.0.0.1:4222")
NATS_PORT = int(NATS_URL.rpartition(":")[2])
POLICY = NetworkPolicy.parse(LOOPBACK_NETWORKS)

# --- the address forms -----------------------------------------------------------------------

# How a host may be written, and what it must come to. Refused: each is link-local, private,
# or otherwise special, in every spelling the resolver could meet.
REFUSED_HOSTS = {
    "v4-link-local": "169.254.169.254",
    "v4-private": "10.1.2.3",
    "v4-unspecified": "0.0.0.0",
    "v6-link-local": "[fe80::1]",
    "v6-unique-local": "[fd00::1]",
    "v4-mapped": "[::ffff:169.254.169.254]",
    "decimal": "2852039166",          # 169.254.169.254 as one number
    "octal": "0251.0376.0251.0376",   # the same in octal
    "hex": "0xa9fea9fe",
    "name-refused": "metadata.test",  # the stub resolves it to 169.254.169.254
    "name-mixed": "mixed.test",       # one loopback address, one private
}
# Allowed (loopback is, by the test services' RELAYQ_DESTINATION_ALLOW_NETWORKS). The gRPC
# and NATS sinks listen on 127.0.0.1 only, so for them IPv6 is here in its IPv4-mapped form
# (an IPv6 socket all the same); the webhook's listens on ::1 too and gets [::1] besides.
ALLOWED_HOSTS = {
    "v4": "127.0.0.1",
    "v4-mapped-ok": "[::ffff:127.0.0.1]",
    "decimal-ok": "2130706433",
    "octal-ok": "0177.0.0.1",
    "name-ok": "sink.test",
}
RULES = {"v4-link-local": "link-local", "v4-private": "private",
         "v4-unspecified": "unspecified", "v6-link-local": "link-local",
         "v6-unique-local": "private", "v4-mapped": "link-local", "decimal": "link-local",
         "octal": "link-local", "hex": "link-local", "name-refused": "link-local",
         "name-mixed": "private"}

STUB_NAMES: dict[str, list[str]] = {
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.1", "10.0.0.1"],
    "sink.test": ["127.0.0.1"],
    "rebind.test": ["127.0.0.1"],
}


@dataclass
class Guard:
    """What the process tried to connect to, and the names it looked up."""

    connects: list[str] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=lambda: dict(STUB_NAMES))

    def outside(self) -> list[str]:
        """Connection attempts anywhere but loopback (each was refused by the guard)."""
        return [host for host in self.connects if not _loopback(host)]


def _loopback(host: str) -> bool:
    address = netpolicy.literal(host)
    if address is None:
        return False
    inner = netpolicy.embedded_ipv4(address)
    return (inner or address).is_loopback


def _grpc_host(target: str) -> str:
    target = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    return target.split(",")[0].rpartition(":")[0]


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> Guard:
    """A stub resolver, a cache that never keeps an answer, and recorded connects that let
    only loopback through."""
    seen = Guard()

    async def lookup(host: str) -> list[netpolicy.IPAddress]:
        seen.lookups.append(host)
        if host not in seen.names:
            raise OSError(f"stub resolver: no such name {host!r}")
        return [ipaddress.ip_address(a) for a in seen.names[host]]

    real_connect = asyncio.base_events.BaseEventLoop.create_connection

    async def create_connection(self: Any, factory: Any, host: Any = None, port: Any = None,
                                *args: Any, **kwargs: Any) -> Any:
        seen.connects.append(str(host))
        if not _loopback(str(host)):
            raise ConnectionRefusedError(f"test guard: no connection to {host}")
        return await real_connect(self, factory, host, port, *args, **kwargs)

    def channel(real: Any) -> Any:
        def make(target: str, *args: Any, **kwargs: Any) -> Any:
            seen.connects.append(_grpc_host(target))
            if not _loopback(_grpc_host(target)):
                raise AssertionError(f"test guard: a gRPC channel to {target}")
            return real(target, *args, **kwargs)
        return make

    monkeypatch.setattr(resolver, "system_lookup", lookup)
    monkeypatch.setattr(resolver, "CACHE_SECONDS", 0.0)
    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "create_connection",
                        create_connection)
    monkeypatch.setattr(grpc.aio, "insecure_channel", channel(grpc.aio.insecure_channel))
    monkeypatch.setattr(grpc.aio, "secure_channel", channel(grpc.aio.secure_channel))
    return seen


@dataclass
class Subject:
    """A NATS stream of this test's own (the server is shared)."""

    prefix: str
    name: str


@pytest.fixture
async def nats_stream() -> AsyncIterator[Subject]:
    suffix = f"{os.getpid()}_{secrets.token_hex(4)}"
    subject = Subject(f"rqpolicy{suffix}", f"RELAYQ_POLICY_{suffix}")
    client = await nats.connect(NATS_URL)
    try:
        js = client.jetstream()
        await js.add_stream(StreamConfig(name=subject.name, subjects=[f"{subject.prefix}.>"]))
        yield subject
        await js.delete_stream(subject.name)
    finally:
        await client.close()


def endpoint(kind: str, host: str, world: World, stream: Subject | None) -> str:
    if kind == "webhook":
        return f"http://{host}:{world.webhook.port}/hook"
    if kind == "grpc":
        return f"{host}:{world.grpc_sink.port}"
    assert stream is not None
    return f"nats://{host}:{NATS_PORT}/{stream.prefix}.{{destination}}.{{user_id}}"


async def add(world: World, kind: str, destination_id: str, url: str) -> None:
    key = await factories.destination(world.conn, world.tenant, destination_id, endpoint=url,
                                      kind=kind, min_backoff_ms=20, max_backoff_ms=100,
                                      timeout_ms=5000)
    await factories.connect(world.conn, world.source.key, key)


async def attempts(world: World) -> dict[str, list[tuple[str, str, str]]]:
    """Each destination's attempts in order: (state, error code, response). A job's history
    is in job_statuses once it has a row; a first attempt that went well is a delivery."""
    cur = await world.conn.execute(
        "SELECT d.id, a.state, a.code, a.response FROM ("
        "  SELECT s.job_id, s.attempt, j.destination_key, s.state::text AS state,"
        "         coalesce(s.error_code, '') AS code, coalesce(s.response, '') AS response"
        "  FROM job_statuses s JOIN jobs j USING (job_id)"
        "  UNION ALL"
        "  SELECT (x.event_id << 16) | c.slot, 1, l.destination_key, 'succeeded', '', ''"
        "  FROM deliveries l CROSS JOIN LATERAL unnest(l.event_ids) AS x(event_id)"
        "  JOIN events e ON e.event_id = x.event_id"
        "  JOIN connections c ON c.source_key = e.source_key"
        "   AND c.destination_key = l.destination_key) a"
        " JOIN destinations d ON d.destination_key = a.destination_key"
        " ORDER BY a.job_id, a.attempt")
    found: dict[str, list[tuple[str, str, str]]] = {}
    for destination_id, state, code, response in await cur.fetchall():
        found.setdefault(destination_id, []).append((state, code, response))
    return found


async def delivered(kind: str, world: World, stream: Subject | None) -> set[str]:
    """The destinations whose event arrived at the sink (webhook, gRPC) or the stream."""
    if kind == "nats":
        assert stream is not None
        client = await nats.connect(NATS_URL)
        try:
            js = client.jetstream()
            info = await js.stream_info(stream.name)
            subjects = [(await js.get_msg(stream.name, seq)).subject
                        for seq in range(info.state.first_seq, info.state.last_seq + 1)
                        ] if info.state.messages else []
        finally:
            await client.close()
        return {subject.split(".")[1] for subject in subjects}
    cur = await world.conn.execute(
        "SELECT c.slot, d.id FROM connections c JOIN destinations d USING (destination_key)"
        " WHERE c.source_key = %s", (world.source.key,))
    by_slot = dict(await cur.fetchall())
    sink = world.webhook if kind == "webhook" else world.grpc_sink
    return {by_slot[r.job_id & 0xFFFF] for r in sink.received}


# --- the matrix ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["webhook", "grpc", "nats"])
async def test_every_refused_form_is_blocked_before_connecting_and_every_allowed_one_delivered(
        kind: str, world: World, guard: Guard, nats_stream: Subject) -> None:
    stream = nats_stream
    allowed = dict(ALLOWED_HOSTS)
    if kind == "webhook":
        # The webhook sink can listen on ::1 too (same port): IPv6 literal, delivered.
        runner = world.webhook._runner
        assert runner is not None
        await web.TCPSite(runner, "::1", world.webhook.port).start()
        allowed["v6"] = "[::1]"
    for destination_id, host in {**REFUSED_HOSTS, **allowed}.items():
        await add(world, kind, destination_id, endpoint(kind, host, world, stream))
    async with ingest(world.database) as service, router(world.database):
        ids = await send(service, world.source, [event("m1")])
        await wait_until_finished(world.conn, len(ids))
    history = await attempts(world)
    for destination_id in REFUSED_HOSTS:
        [(state, code, response)] = history[destination_id]
        assert (state, code) == ("aborted", "blocked_address"), destination_id
        assert RULES[destination_id] in response, (destination_id, response)
        assert netpolicy.ALLOW_VARIABLE in response
    # A name's addresses are not shown to the tenant, only the rule.
    assert "169.254" not in history["name-refused"][0][2]
    for destination_id in allowed:
        assert [a[:2] for a in history[destination_id]] == [("succeeded", "")], destination_id
    assert await delivered(kind, world, stream) == set(allowed)
    assert guard.outside() == []
    # Names went to the stub resolver only, and numbers were never taken for names.
    assert set(guard.lookups) <= set(STUB_NAMES)


@pytest.mark.parametrize("kind", ["webhook", "grpc", "nats"])
async def test_a_name_that_rebinds_to_a_refused_address_is_refused_at_the_next_attempt(
        kind: str, world: World, guard: Guard, nats_stream: Subject) -> None:
    stream = nats_stream
    await add(world, kind, "rebind", endpoint(kind, "rebind.test", world, stream))
    async with ingest(world.database) as service, router(world.database):
        first = await send(service, world.source, [event("m1")])
        await wait_until_finished(world.conn, 1)
        # The same destination, its connection (kept alive, a channel, a NATS connection)
        # still open to 127.0.0.1: the name now leads to a private address.
        guard.names["rebind.test"] = ["10.0.0.1"]
        second = await send(service, world.source, [event("m2")])
        await wait_until_finished(world.conn, 2)
    final = await states(world.conn)
    assert (final[first[0]], final[second[0]]) == ("succeeded", "aborted")
    history = await attempts(world)
    assert [a[1] for a in history["rebind"]] == ["", "blocked_address"]
    assert await delivered(kind, world, stream) == {"rebind"}
    if kind != "nats":  # the stream holds one message, checked above
        sink = world.webhook if kind == "webhook" else world.grpc_sink
        assert [r.job_id for r in sink.received] == first
    assert guard.outside() == []


# --- redirects -------------------------------------------------------------------------------


async def test_a_redirect_to_a_refused_address_is_not_followed(world: World, guard: Guard
                                                               ) -> None:
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPTemporaryRedirect("http://169.254.169.254/latest/meta-data/")

    runner, port = await serve_post("/hook", redirect)
    try:
        await add(world, "webhook", "moved", f"http://127.0.0.1:{port}/hook")
        async with ingest(world.database) as service, router(world.database):
            ids = await send(service, world.source, [event("m1")])
            await wait_until_finished(world.conn, len(ids))
    finally:
        await runner.cleanup()
    # The 307 is the answer: the job is given up, as for any 3xx or 4xx, and nothing follows.
    assert [a[:2] for a in (await attempts(world))["moved"]] == [("aborted", "307")]
    assert hits == ["/hook"]
    assert set(guard.connects) == {"127.0.0.1"}


# --- the admin service: literal addresses are refused at create and update -------------------


@pytest.fixture
async def service(database: str) -> AsyncIterator[Admin]:
    async with admin(database) as running:
        await running.stub.CreateTenant(admin_pb2.CreateTenantRequest(id="acme", name="Acme"),
                                        metadata=Admin.auth())
        yield running


LITERAL_ENDPOINTS = {
    "webhook": "http://{host}:8080/hook",
    "grpc": "{host}:7000",
    "nats": "nats://{host}:4222/events.{{user_id}}",
}


@pytest.mark.parametrize("kind", ["webhook", "grpc", "nats"])
async def test_admin_refuses_endpoints_written_as_refused_addresses_naming_the_rule(
        kind: str, service: Admin) -> None:
    literal = {name: host for name, host in REFUSED_HOSTS.items()
               if not name.startswith("name-")}
    for name, host in literal.items():
        url = LITERAL_ENDPOINTS[kind].format(host=host)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
                id=f"d-{kind}", tenant_id="acme", type=kind, endpoint=url),
                metadata=Admin.auth())
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        details = refused.value.details() or ""
        assert details.startswith("endpoint: "), details
        assert RULES[name] in details, (url, details)
        assert netpolicy.ALLOW_VARIABLE in details
    # Names are not resolved by admin (the router checks where they lead at every attempt);
    # allowed literals pass; an update to a refused literal is refused like a create.
    for host in ("metadata.test", "127.0.0.1", "[::1]"):
        await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id=f"ok-{secrets.token_hex(3)}", tenant_id="acme", type=kind,
            endpoint=LITERAL_ENDPOINTS[kind].format(host=host)), metadata=Admin.auth())
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="later", tenant_id="acme", type=kind,
        endpoint=LITERAL_ENDPOINTS[kind].format(host="example.com")), metadata=Admin.auth())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
            id="later", endpoint=LITERAL_ENDPOINTS[kind].format(host="[::ffff:10.0.0.1]")),
            metadata=Admin.auth())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "private" in (refused.value.details() or "")


async def test_admin_refuses_localhost_names_unless_loopback_is_allowed(database: str) -> None:
    async with admin(database, RELAYQ_DESTINATION_ALLOW_NETWORKS="") as running:
        await running.stub.CreateTenant(admin_pb2.CreateTenantRequest(id="acme", name="Acme"),
                                        metadata=Admin.auth())
        for url in ("http://localhost:8080/", "http://api.localhost/", "http://127.0.0.1/"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await running.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
                    tenant_id="acme", type="webhook", endpoint=url), metadata=Admin.auth())
            assert "loopback" in (refused.value.details() or ""), url


# --- the policy itself ---------------------------------------------------------------------


@pytest.mark.parametrize(("host", "rule"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1%25eth0", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "private"), ("fd12:3456::1", "private"), ("fec0::1", "private"),
    ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"), ("240.0.0.1", "reserved"),
    ("2001:db8::1", "reserved"), ("::7f00:1", "reserved"), ("100::1", "reserved"),
    ("4000::1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:a9fe:a9fe", "link-local"),
    ("64:ff9b::a00:1", "private"), ("2002:c0a8:101::1", "private"),
    ("2130706433", "loopback"), ("0x7f.1", "loopback"), ("127.1", "loopback"),
    ("0177.0.0.1", "loopback"), ("3232235777", "private"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None), ("1.1.1.1", None),
])
def test_rules_name_every_special_range_in_every_form(host: str, rule: str | None) -> None:
    address = netpolicy.literal(host)
    assert address is not None
    assert NetworkPolicy().refusal(address) == rule


def test_the_allow_list_allows_its_networks_and_their_mapped_forms() -> None:
    policy = NetworkPolicy.parse("127.0.0.0/8, ::1/128,10.1.0.0/16")
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.1.2.3", "2130706433"):
        address = netpolicy.literal(host)
        assert address is not None, host
        assert policy.refusal(address) is None, host
    for host in ("10.2.0.1", "169.254.169.254", "::ffff:10.2.0.1"):
        address = netpolicy.literal(host)
        assert address is not None, host
        assert policy.refusal(address) is not None, host
    with pytest.raises(ValueError, match="not a network"):
        NetworkPolicy.parse("10.0.0.0/8,intranet")


def test_names_are_not_literals() -> None:
    for host in ("example.com", "1.2.3.4.5", "08.1.1.1", "cafe", "0x7f.example", "1e3"):
        assert netpolicy.literal(host) is None, host


async def test_nats_never_connects_to_servers_a_server_advertises(guard: Guard) -> None:
    """A NATS server's INFO may list other servers (connect_urls) that nats-py would add to
    its pool and reconnect to; the router's client ignores them."""
    from router_service.senders.nats import _PinnedClient

    info = (b'INFO {"server_id":"fake","version":"2.10.0","max_payload":1048576,'
            b'"headers":true,"proto":1,"connect_urls":["169.254.169.254:4222"]}\r\n')
    connections = 0

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(info)
        while line := await reader.readline():
            if line.startswith(b"PING"):
                writer.write(b"PONG\r\n")
                await writer.drain()
                if connections == 1:
                    break  # the first connection is cut: the client reconnects
        writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = _PinnedClient()
    try:
        await client.connect(servers=[f"nats://127.0.0.1:{port}"], allow_reconnect=True,
                             reconnect_time_wait=0.05, max_reconnect_attempts=-1,
                             connect_timeout=2)
        for _ in range(100):
            if connections >= 2:
                break
            await asyncio.sleep(0.05)
        assert connections >= 2  # it did reconnect, and only here
        assert client.discovered_servers == []
    finally:
        await client.close()
        server.close()
    assert guard.outside() == []
    assert set(guard.connects) == {"127.0.0.1"}
