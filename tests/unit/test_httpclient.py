"""The router's HTTP/1.1 client (router_service/httpclient.py) against real servers on
loopback: a scripted raw TCP server for the answers real servers give now and then (chunked,
interim 100, close-delimited, oversized, silent, not HTTP at all), and aiohttp's server for
an ordinary one. Also under uvloop, the loop the router runs on."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop
from aiohttp import web

from router_service import httpclient
from router_service.httpclient import HttpPool, InvalidURL, parse_target
from tests.helpers import loopback_resolver
from tests.poll import eventually
from tests.sinks import serve_post

Script = Callable[["Request", asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class Request:
    head: bytes
    body: bytes
    connection: int


@dataclass
class RawServer:
    """Reads each request whole, then lets `script` answer it (True: keep the connection)."""

    script: Script
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                request = Request(head, body, number)
                self.requests.append(request)
                if not await self.script(request, writer):
                    return
        finally:
            writer.close()


def answer(raw: bytes, *, keep: bool = True) -> Script:
    async def script(_: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def pool() -> AsyncIterator[HttpPool]:
    pool = HttpPool(ssl.create_default_context(), body_limit=100, resolver=loopback_resolver())
    yield pool
    await pool.close()


async def serve(script: Script) -> RawServer:
    server = RawServer(script)
    await server.start()
    return server


async def post(pool: HttpPool, url: str, body: bytes = b"{}", within: float = 5.0
               ) -> httpclient.Response:
    target = parse_target(url)
    head = (f"Host: {target.host_header}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return await pool.request(target, head, body, within)


async def test_requests_share_a_kept_alive_connection_and_arrive_whole(pool: HttpPool) -> None:
    server = await serve(answer(OK))
    try:
        for n in range(5):
            response = await post(pool, server.url, b'{"n": %d}' % n)
            assert (response.status, response.body) == (200, b"ok")
        assert server.connections == 1
        assert [r.body for r in server.requests] == [b'{"n": %d}' % n for n in range(5)]
        first = server.requests[0].head.split(b"\r\n")
        assert first[0] == b"POST /hook?x=1 HTTP/1.1"
        assert b"Content-Type: application/json" in first
        # Five at once need five connections, and then keep them.
        await asyncio.gather(*(post(pool, server.url) for _ in range(5)))
        await asyncio.gather(*(post(pool, server.url) for _ in range(5)))
        assert server.connections == 5
    finally:
        await server.stop()


async def test_a_connection_the_server_closes_is_not_used_again(pool: HttpPool) -> None:
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0"
                                b"\r\n\r\n", keep=False))
    try:
        for _ in range(3):
            assert (await post(pool, server.url)).status == 200
        assert server.connections == 3
    finally:
        await server.stop()


async def test_a_stale_kept_alive_connection_is_replaced_and_the_request_sent_again(
        pool: HttpPool) -> None:
    """The server drops a kept-alive connection at the moment the next request arrives on
    it (as one whose idle timeout just fired does): no answer came, so the client sends the
    request once more on a new connection."""

    async def script(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1 and len(server.requests) == 2:
            return False  # close without a word
        writer.write(OK)
        await writer.drain()
        return True

    server = await serve(script)
    try:
        assert (await post(pool, server.url, b"1")).status == 200
        assert (await post(pool, server.url, b"2")).status == 200
        assert [(r.connection, r.body) for r in server.requests] == [
            (1, b"1"), (1, b"2"), (2, b"2")]
    finally:
        await server.stop()


async def test_a_fresh_connection_closed_without_an_answer_is_an_error(pool: HttpPool) -> None:
    server = await serve(lambda request, writer: asyncio.sleep(0, False))
    try:
        with pytest.raises(httpclient.Disconnected):
            await post(pool, server.url)
        assert len(server.requests) == 1  # not sent twice: the connection was new
    finally:
        await server.stop()


async def test_answers_in_every_framing(pool: HttpPool) -> None:
    answers = {
        "chunked": (b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nRetry-After: 7\r\n\r\n"
                    b"4\r\nbusy\r\n5\r\n now!\r\n0\r\n\r\n", (503, "7", b"busy now!")),
        "interim": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0"
                    b"\r\n\r\n", (201, None, b"")),
        "until close": (b"HTTP/1.0 500 Oops\r\n\r\nall of it", (500, None, b"all of it")),
    }
    for name, (raw, expected) in answers.items():
        server = await serve(answer(raw, keep=name != "until close"))
        try:
            response = await post(pool, server.url)
            assert (response.status, response.retry_after, response.body) == expected, name
        finally:
            await server.stop()


async def test_a_second_answer_to_one_request_retires_the_connection(pool: HttpPool) -> None:
    server = await serve(answer(OK + OK))
    try:
        assert (await post(pool, server.url)).status == 200
        assert (await post(pool, server.url)).status == 200
        assert server.connections == 2
    finally:
        await server.stop()


async def test_an_oversized_answer_is_cut_and_its_connection_dropped(pool: HttpPool) -> None:
    big = b"x" * 100_000
    server = await serve(answer(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(big), big)))
    try:
        response = await post(pool, server.url)
        assert (response.status, response.body) == (500, b"x" * 100)  # body_limit
        await post(pool, server.url)
        assert server.connections == 2
    finally:
        await server.stop()


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    await eventually(condition, within=within, every=0.02)


async def test_silence_times_out_and_the_connection_goes(pool: HttpPool) -> None:
    release = asyncio.Event()

    async def silent(_: Request, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return False

    server = await serve(silent)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await post(pool, server.url, within=0.3)
        assert asyncio.get_running_loop().time() - started < 2
        await until(lambda: pool.open_connections == 0)
    finally:
        release.set()
        await server.stop()


async def test_not_http_and_nobody_listening_are_errors(pool: HttpPool) -> None:
    server = await serve(answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    try:
        with pytest.raises(httpclient.ProtocolError):
            await post(pool, server.url)
    finally:
        await server.stop()
    with pytest.raises(ConnectionRefusedError):  # the port was just let go
        await post(pool, server.url)


def test_endpoints_are_encoded_as_sent() -> None:
    target = parse_target("http://bücher.example/a b/é?q=ü")
    assert target.origin == httpclient.Origin("xn--bcher-kva.example", 80, tls=False)
    assert target.request_line == b"POST /a%20b/%C3%A9?q=%C3%BC HTTP/1.1\r\n"
    assert target.host_header == "xn--bcher-kva.example"
    ipv6 = parse_target("https://[::1]:8443")
    assert (ipv6.origin, ipv6.request_line, ipv6.host_header) == (
        httpclient.Origin("::1", 8443, tls=True), b"POST / HTTP/1.1\r\n", "[::1]:8443")
    assert parse_target("https://h.example:443/x").host_header == "h.example"
    for bad in ("ftp://h/x", "http:///nohost", "http://h:0/x", "not a url", "http://h:99999/"):
        with pytest.raises(InvalidURL):
            parse_target(bad)


async def test_an_ordinary_server_and_idle_connections_closed_after_a_while() -> None:
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=429, headers={"Retry-After": "3"}, text="slow down")

    runner, port = await serve_post("/hook", hook)
    pool = HttpPool(ssl.create_default_context(), body_limit=100, idle_seconds=0.2,
                    resolver=loopback_resolver())
    try:
        response = await post(pool, f"http://127.0.0.1:{port}/hook", b'{"a": 1}')
        assert (response.status, response.retry_after, response.body) == (429, "3", b"slow down")
        assert received == [b'{"a": 1}']
        assert pool.open_connections == 1
        await until(lambda: pool.open_connections == 0)
    finally:
        await pool.close()
        await runner.cleanup()


def test_under_uvloop() -> None:
    """The router's loop: its transports differ from asyncio's (not Transport subclasses)."""

    async def scenario() -> None:
        server = await serve(answer(OK))
        pool = HttpPool(ssl.create_default_context(), body_limit=100, resolver=loopback_resolver())
        try:
            results = await asyncio.gather(*(post(pool, server.url) for _ in range(20)))
            assert {r.status for r in results} == {200}
            for _ in range(20):
                assert (await post(pool, server.url)).status == 200
            assert server.connections == 20
        finally:
            await pool.close()
            await server.stop()

    uvloop.run(scenario())
