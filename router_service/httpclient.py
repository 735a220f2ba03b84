"""HTTP/1.1 for webhook delivery: keep-alive connections pooled per origin, one write per
request, responses parsed by httptools (llhttp, the parser Node.js uses).

Why not aiohttp's client, which delivered webhooks before: the router sends one kind of
request (a POST of a body it already holds, no redirects, cookies, proxies, compression or
streamed uploads), and aiohttp's general machinery around it cost 60-90 us of CPU per request
on the development machine, more than the rest of a delivery together; this client costs
9-10 us per request in the same measurement (docs/benchmarks.md, "Webhook throughput"). What
is left to write by hand is what is particular to us (pooling, deadlines, reading a bounded
excerpt of an answer); the part that is easy to get wrong, parsing responses (chunked bodies,
keep-alive rules, 1xx), is httptools'.

Every request asks the router's resolver (router_service.resolver) where its host leads, and
so the network policy whether it may go there, before a pooled connection is taken or a new
one made: connections are pooled per origin *and* address, and a new one is made to the
address checked, as a literal, so nothing resolves the name again in between. Redirects are
never followed: a 3xx is an answer like any other (it aborts the job, as a 4xx does).

A connection carries one request at a time (no pipelining). A pooled connection that the
server closed while idle is dropped when its close arrives; a request that loses the race
with such a close (the connection was reused, and it ended before a byte of answer came) is
sent once more on a new connection, as browsers do: the server closed it, so it read nothing.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, cast

import httptools
import yarl

from relayq.netpolicy import IPAddress
from router_service.resolver import Resolver

# Idle connections are closed after this (most servers close theirs after 5 to 75 s).
IDLE_SECONDS = 30.0
# Idle connections kept per origin at most (concurrency in flight is the lane's to bound).
MAX_IDLE_PER_ORIGIN = 256


class InvalidURL(ValueError):
    """An endpoint this client cannot send to; the message says why."""


class ProtocolError(ConnectionError):
    """The server's answer was not HTTP/1.x."""


class Disconnected(ConnectionError):
    """The connection ended before a whole answer came."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where connections go: requests to one origin share its pooled connections."""

    host: str
    port: int
    tls: bool

    @property
    def server_hostname(self) -> str | None:
        return self.host if self.tls else None


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed endpoint: the origin to connect to, and what names it in a request."""

    origin: Origin
    # b"POST /path?query HTTP/1.1\r\n"
    request_line: bytes
    # "host[:port]" (the port only when it is not the scheme's default)
    host_header: str


def parse_target(url: str, method: str = "POST") -> Target:
    """The endpoint as we send to it: the path percent-encoded and the host IDNA-encoded
    (as yarl, aiohttp's URL library, does), so what an operator typed is what goes out."""
    try:
        parsed = yarl.URL(url)
        host = parsed.raw_host
        port = parsed.port
    except (ValueError, UnicodeError) as exc:
        raise InvalidURL(f"not a usable URL ({exc}): {url!r}") from None
    if parsed.scheme not in ("http", "https") or not host or not port:
        raise InvalidURL(f"not an http:// or https:// URL with a host and port: {url!r}")
    tls = parsed.scheme == "https"
    name = f"[{host}]" if ":" in host else host
    host_header = name if port == (443 if tls else 80) else f"{name}:{port}"
    try:
        line = f"{method} {parsed.raw_path_qs or '/'} HTTP/1.1\r\n".encode("ascii")
    except UnicodeEncodeError:
        raise InvalidURL(f"not a usable URL (non-ASCII after encoding): {url!r}") from None
    return Target(Origin(host, port, tls), line, host_header)


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a pooled connection goes: an origin at one of the addresses it resolved to."""

    origin: Origin
    address: IPAddress


class Response(NamedTuple):
    status: int
    # The Retry-After header as sent, or None.
    retry_after: str | None
    # The start of the body, at most the pool's body_limit bytes.
    body: bytes


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; callbacks from the event loop and from httptools."""

    __slots__ = (
        "_answered",
        "_body",
        "_body_size",
        "_parser",
        "_peer",
        "_pool",
        "_retry_after",
        "_reusable",
        "_status",
        "_waiter",
        "closed",
        "idle_since",
        "transport",
        "used",
    )

    def __init__(self, pool: HttpPool, peer: Peer) -> None:
        self._pool = pool
        self._peer = peer
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._status = 0
        self._retry_after: str | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        # Some byte of an answer arrived for the request in flight.
        self._answered = False
        self._reusable = True
        self.closed = False
        self.idle_since = 0.0
        # Has carried a request before (a stale keep-alive connection can only be one).
        self.used = False

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._answered = True
        if self._waiter is None:  # bytes nobody asked for: the connection is not usable
            self._reusable = False
            self.abort()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self._peer, self)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._status:
            # The body ended with the connection (no Content-Length, not chunked), or the
            # server cut it short: the status is what we act on either way.
            self._resolve()
            return
        reason = f": {exc}" if exc is not None else ""
        self._fail(Disconnected(f"connection closed before a complete answer{reason}"))

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second answer to one request (in the same read as the first): the server and
            # we disagree on where messages end, so nothing more is read from it.
            self._reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._status < 200:
            return
        limit = self._pool.body_limit
        if self._body_size < limit:
            self._body.append(body[:limit - self._body_size])
        self._body_size += len(body)
        if self._body_size > limit:
            # Enough to tell the operator what it said; the rest is not read (a destination
            # answering with megabytes must not cost the router them), so the connection
            # cannot carry another request.
            self._reusable = False
            self._resolve()

    def on_message_complete(self) -> None:
        if self._status < 200:  # 100 Continue and other interim answers: the real one follows
            self._status = 0
            self._retry_after = None
            return
        if not self._parser.should_keep_alive():
            self._reusable = False
        self._resolve()

    # --- requests ------------------------------------------------------------------------

    def send(self, data: bytes, waiter: asyncio.Future[Response]) -> None:
        assert self.transport is not None
        self._waiter = waiter
        self._status = 0
        self._retry_after = None
        self._body = []
        self._body_size = 0
        self._answered = False
        self.transport.write(data)

    @property
    def answered(self) -> bool:
        return self._answered

    @property
    def reusable(self) -> bool:
        return self._reusable and not self.closed and self._waiter is None

    def abort(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.abort()

    def _resolve(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._retry_after, b"".join(self._body)))
        if not self._reusable:
            self.abort()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        self._reusable = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()


class HttpPool:
    """Keep-alive connections for every webhook of a router, pooled per origin, so ten
    destinations at one receiver share its connections as they would with any client."""

    def __init__(self, ssl_context: ssl.SSLContext, *, body_limit: int, resolver: Resolver,
                 idle_seconds: float = IDLE_SECONDS,
                 max_idle_per_origin: int = MAX_IDLE_PER_ORIGIN) -> None:
        self._ssl = ssl_context
        self._resolver = resolver
        self.body_limit = body_limit
        self._idle_seconds = idle_seconds
        self._max_idle = max_idle_per_origin
        # Most recently used last: requests take the warmest connection.
        self._idle: dict[Peer, deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, target: Target, head: bytes, body: bytes, within: float
                      ) -> Response:
        """Send a request (its first line from `target`, then `head`: the header lines and the
        blank line, then `body`) and read the answer, all within `within` seconds.

        Raises TimeoutError, resolver.BlockedAddress (the host leads where the network policy
        refuses: nothing was sent, no connection made), or OSError: refused, reset,
        unresolvable, TLS (ssl.SSLError), or this module's ConnectionErrors (Disconnected,
        ProtocolError). The deadline is one
        loop timer per request, not asyncio.timeout, whose cancel-and-uncancel of the task is
        dearer and is not needed to end a wait on a future."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        payload = b"".join((target.request_line, head, body))
        origin = target.origin
        addresses = await self._resolver.addresses(origin.host)
        connection = await self._connection(origin, addresses, deadline)
        try:
            return await self._exchange(connection, payload, deadline)
        except ConnectionError:
            if not connection.used or connection.answered:
                raise
        # A keep-alive connection the server had closed (its close was still on the way):
        # nothing was read from it, so the request goes once more on a fresh connection.
        connection = await self._connection(origin, addresses, deadline, fresh=True)
        return await self._exchange(connection, payload, deadline)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self._open):
            connection.abort()
        self._idle.clear()

    # --- inside --------------------------------------------------------------------------

    async def _connection(self, origin: Origin, addresses: tuple[IPAddress, ...],
                          deadline: float, *, fresh: bool = False) -> _Connection:
        """A kept-alive connection to one of `addresses` (checked by the resolver), or a new
        one to the first that takes it, connected to the address itself."""
        if not fresh:
            for address in addresses:
                idle = self._idle.get(Peer(origin, address))
                while idle:
                    connection = idle.pop()
                    if connection.reusable:
                        return connection
        loop = asyncio.get_running_loop()
        failure: OSError | None = None
        for address in addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            peer = Peer(origin, address)
            try:
                async with asyncio.timeout(remaining):
                    _, connection = await loop.create_connection(
                        functools.partial(_Connection, self, peer), str(address),
                        origin.port, ssl=self._ssl if origin.tls else None,
                        server_hostname=origin.server_hostname)
            except OSError as exc:  # refused, unreachable: the next address may answer
                if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                    raise
                failure = exc
                continue
            self._open.add(connection)
            return connection
        assert failure is not None
        raise failure

    async def _exchange(self, connection: _Connection, payload: bytes, deadline: float
                        ) -> Response:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        timer = loop.call_at(deadline, _expire, waiter)
        connection.send(payload, waiter)
        try:
            response = await waiter
        except BaseException:
            # A timeout, a cancellation (the router stopping) or a broken connection: what
            # is on the wire is unknown, so the connection goes.
            connection.abort()
            raise
        finally:
            timer.cancel()
        connection.used = True
        if connection.reusable and not self._closed:
            self._park(connection)
        else:
            connection.abort()
        return response

    def _park(self, connection: _Connection) -> None:
        idle = self._idle.get(connection._peer)
        if idle is None:
            idle = self._idle[connection._peer] = deque()
        if len(idle) >= self._max_idle:
            idle.popleft().abort()
        connection.idle_since = time.monotonic()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_seconds / 2,
                                                                  self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than idle_seconds (oldest first in each deque)."""
        self._sweeper = None
        cutoff = time.monotonic() - self._idle_seconds
        for peer, idle in list(self._idle.items()):
            while idle and idle[0].idle_since < cutoff:
                idle.popleft().abort()
            if not idle:
                del self._idle[peer]
        if self._idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_seconds / 2,
                                                                  self._sweep)

    def _forget(self, peer: Peer, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(peer)
        if idle is not None and connection in idle:
            idle.remove(connection)

    @property
    def open_connections(self) -> int:
        return len(self._open)


def _expire(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
