"""Delivery to NATS JetStream: each job published to a subject, done when the stream has it.

A job succeeds when JetStream answers the publish with a PubAck (the message is stored). Every
publish carries `Nats-Msg-Id: <destination id>-<job id>`, the same on every attempt, so when an
ack is lost (a timeout, a router killed between the publish and recording it) the next attempt
is dropped by the stream's duplicate window instead of stored twice.

Order per user holds at the stream because a job of a user is published only after the PubAck
of that user's previous job (the barrier), and a batch never holds two jobs of one user, so
the jobs of a batch are published concurrently.

The subject comes from the endpoint's template (relayq.destination_types.parse_nats). Values
filled in are percent-encoded as in URLs, '.' included (see `token`): a user id such as
"a.b *>" stays one token and can never become a wildcard or another subject's prefix.

Connections are shared: one per NATS server URL (credentials and TLS included) per router, not
one per destination, and nats-py reconnects it after a loss. Publishes made while it reconnects
wait in its buffer and go out when it is back; their acks arrive in time or the attempt fails
as a timeout and the retry is de-duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext

from jobsdb.catalog import Destination
from relayq import destination_types
from relayq.netpolicy import IPAddress
from router_service import tracing
from router_service.model import Job
from router_service.resolver import BlockedAddress
from router_service.retry import Result, Verdict
from router_service.senders.base import Sender, SenderContext

log = logging.getLogger(__name__)

# Jobs per deliver() call: they are published concurrently and their acks awaited together.
MAX_BATCH = 100
# JetStream's error code for a message over the stream's max_msg_size: no retry fits it in.
_MSG_TOO_LARGE = 10054
# What the NATS protocol adds around headers ("NATS/1.0\r\n" before, "\r\n" after): the server
# counts headers and payload together against max_payload.
_HEADER_FRAME = 12


class NatsSender(Sender):
    # Jobs of a batch are published concurrently: never two of one user (the default
    # per_user).
    max_batch = MAX_BATCH

    def __init__(self, destination: Destination, context: SenderContext) -> None:
        self._destination_id = destination.id
        self._timeout = destination.timeout_ms / 1000
        # Admin refuses Nats-* names; a row written otherwise must not steer JetStream.
        self._headers = {name: value for name, value in destination.headers.items()
                         if not name.lower().startswith("nats-")}
        self._header_bytes = _header_bytes(self._headers)
        self._server: _Server | None = None
        self._subject: _Subject | None = None
        self._unusable = ""
        try:
            endpoint = destination_types.parse_nats(destination.endpoint)
        except destination_types.Unusable as exc:
            # Admin refuses such endpoints; a row written otherwise (by hand) fails its
            # deliveries with the reason, retried: the operator can fix it.
            self._unusable = str(exc)
            return
        self._subject = _Subject(endpoint.subject, tenant=destination.tenant_id,
                                 destination=destination.id)
        self._url = endpoint.server
        self._host = urlsplit(endpoint.server).hostname or ""
        self._tls = context.trust.ssl_context if endpoint.tls else None
        self._resolver = context.resolver
        # The addresses the server's name led to at the last attempt (the connection's).
        self._addresses: tuple[IPAddress, ...] = ()

    async def _server_for_now(self) -> _Server:
        """The connection to where the server's name leads now, checked by the network policy
        at every attempt (BlockedAddress, or OSError when the name does not resolve)."""
        addresses = await self._resolver.addresses(self._host)
        if self._server is None or addresses != self._addresses:
            if self._server is not None:
                server, self._server = self._server, None
                await server.release()
            self._server = _Server.acquire(self._url, addresses[0], self._host, self._tls)
            self._addresses = addresses
        return self._server

    async def deliver(self, jobs: Sequence[Job]) -> list[Result]:
        with tracing.start("nats", self._destination_id, jobs) as attempt:
            results = await self._deliver(jobs, attempt.traceparents)
            attempt.finish(results)
        return results

    async def _deliver(self, jobs: Sequence[Job], traceparents: list[str | None]
                       ) -> list[Result]:
        if self._subject is None:
            return [Result(Verdict.RETRY, "config", self._unusable)] * len(jobs)
        try:
            server = await self._server_for_now()
        except BlockedAddress as exc:  # no connection was made
            return [Result(Verdict.ABORT, exc.error_code, str(exc))] * len(jobs)
        except OSError as exc:
            return [Result(Verdict.RETRY, "connection", f"{type(exc).__name__}: {exc}")
                    ] * len(jobs)
        try:
            client, js = await server.ready(self._timeout)
        except _Unreachable as exc:
            return [Result(Verdict.RETRY, exc.code, exc.reason)] * len(jobs)
        if len(jobs) == 1:
            return [await self._publish(client, js, self._subject, jobs[0], traceparents[0])]
        return list(await asyncio.gather(
            *(self._publish(client, js, self._subject, job, traceparent)
              for job, traceparent in zip(jobs, traceparents, strict=True))))

    async def _publish(self, client: Client, js: JetStreamContext, template: _Subject,
                       job: Job, traceparent: str | None) -> Result:
        subject = template.render(job)
        payload = job.payload.encode()
        own = {
            "Nats-Msg-Id": f"{self._destination_id}-{job.job_id}",
            "X-Relayq-Message-Id": job.message_id,
            "X-Relayq-Job-Id": str(job.job_id),
            "X-Relayq-Attempt": str(job.attempt),
            "X-Relayq-User-Id": job.user_id,
        }
        if traceparent is not None:
            own["traceparent"] = traceparent
        # The server closes the connection (failing every publish on it) on a message over
        # its max_payload, headers counted; nats-py checks the payload alone. So check here.
        size = len(payload) + _HEADER_FRAME + self._header_bytes + _header_bytes(own)
        if size > client.max_payload:
            return Result(Verdict.ABORT, "nats:max_payload",
                          f"{size} bytes with headers exceed the server's max_payload of"
                          f" {client.max_payload}")
        headers = {**self._headers, **own}
        # js.publish, not publish_async (a third less client CPU, measured): in nats-py 2.16
        # the latter's reply handler raises on a JetStream error instead of failing the
        # publish's future, so a message over the stream's limit would read as a timeout.
        try:
            await js.publish(subject, payload, timeout=self._timeout, headers=headers)
        except nats.js.errors.NoStreamResponseError:
            return Result(Verdict.RETRY, "nats:no_stream",
                          f"no JetStream stream captures subject {subject!r} (no responders)")
        except TimeoutError:  # nats.errors.TimeoutError is one
            return Result(Verdict.RETRY, "timeout",
                          f"no acknowledgement within {self._timeout:g}s")
        except nats.errors.MaxPayloadError:
            return Result(Verdict.ABORT, "nats:max_payload",
                          f"{size} bytes exceed the server's max_payload of {client.max_payload}")
        except nats.js.errors.APIError as exc:
            if exc.err_code == _MSG_TOO_LARGE:
                return Result(Verdict.ABORT, "nats:max_msg_size",
                              f"stream refused {len(payload)} bytes: {exc.description}")
            return Result(Verdict.RETRY, f"nats:api:{exc.err_code or exc.code}", str(exc))
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError) as exc:
            return Result(Verdict.RETRY, "connection", f"{type(exc).__name__}: {exc}")
        except nats.errors.Error as exc:
            return Result(Verdict.RETRY, "nats:error", f"{type(exc).__name__}: {exc}")
        return Result(Verdict.OK)

    async def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.release()


def _header_bytes(headers: dict[str, str]) -> int:
    return sum(len(name) + len(value.encode()) + 4 for name, value in headers.items())


def token(value: str) -> str:
    """`value` as one subject token: percent-encoded as in URLs (UTF-8; letters, digits, '-',
    '_' and '~' stay), '.' included. `urllib.parse.unquote` turns it back, but for two cases:
    an empty value is '_' and a value that is exactly '_' is '%5F', so the two stay apart."""
    if not value:
        return "_"
    if value == "_":
        return "%5F"
    if value.isalnum() and value.isascii():  # most ids: nothing to encode
        return value
    return quote(value, safe="").replace(".", "%2E")


def event_name(payload: str) -> str:
    """The event document's "event" (a track call's name); empty when it has none."""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return ""
    name = document.get("event") if isinstance(document, dict) else None
    return name if isinstance(name, str) else ""


class _Subject:
    """A subject template with the destination's own values filled in once."""

    def __init__(self, pieces: tuple[str, ...], *, tenant: str, destination: str) -> None:
        fixed = {"tenant": token(tenant), "destination": token(destination)}
        # Literal text and per-job placeholders, alternating: [text, name, text, ...].
        merged: list[str] = [pieces[0]]
        for index in range(1, len(pieces), 2):
            name, text = pieces[index], pieces[index + 1]
            if name in fixed:
                merged[-1] += fixed[name] + text
            else:
                merged += [name, text]
        self._pieces = tuple(merged)
        self._needs_event = "event" in merged[1::2]

    def render(self, job: Job) -> str:
        pieces = self._pieces
        if len(pieces) == 1:
            return pieces[0]
        values = {"user_id": token(job.user_id)}
        if self._needs_event:
            values["event"] = token(event_name(job.payload))
        parts = [pieces[0]]
        for index in range(1, len(pieces), 2):
            parts += [values[pieces[index]], pieces[index + 1]]
        return "".join(parts)


class _Unreachable(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_Key = tuple[asyncio.AbstractEventLoop, str, IPAddress, ssl.SSLContext | None]


class _PinnedClient(Client):
    """nats-py's client, less server discovery: a server's INFO may list other servers of its
    cluster (`connect_urls`), which nats-py adds to its pool and reconnects to; whoever runs
    the server could steer the router anywhere by them, past the network policy. A router
    connects only to the address its resolver checked; a cluster is reached through its
    name's addresses, re-checked at every attempt."""

    async def _process_info(self, info: dict[str, Any],
                            initial_connection: bool = False) -> None:
        await super()._process_info({k: v for k, v in info.items() if k != "connect_urls"},
                                    initial_connection)


def pinned_url(url: str, address: IPAddress) -> str:
    """`url` (scheme://[credentials@]host[:port]) with the host replaced by `address`."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    host = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{credentials}@{host}" if credentials else host
    return f"{parts.scheme}://{netloc}:{parts.port or 4222}"


class _Server:
    """One connection to a NATS server, shared by every destination of this router that
    publishes there (same URL, credentials, address and TLS): ten thousand destinations on one
    NATS cluster cost one connection. Reference-counted; closed when its last sender closes.

    It connects to the address the resolver checked, written as a literal (the TLS
    certificate is still checked against the name), and reconnects only there."""

    # Per event loop (a connection belongs to the loop it was made on) and TLS context.
    _open: ClassVar[dict[_Key, _Server]] = {}

    @classmethod
    def acquire(cls, url: str, address: IPAddress, host: str, tls: ssl.SSLContext | None
                ) -> _Server:
        key = (asyncio.get_running_loop(), url, address, tls)
        server = cls._open.get(key)
        if server is None:
            server = cls._open[key] = cls(key, url, address, host, tls)
        server._users += 1
        return server

    def __init__(self, key: _Key, url: str, address: IPAddress, host: str,
                 tls: ssl.SSLContext | None) -> None:
        self._key = key
        # What logs and job histories show: the URL as written, less credentials.
        self._shown = _safe(url)
        self._url = pinned_url(url, address)
        self._host = host
        self._tls = tls
        self._users = 0
        self._client = _PinnedClient()
        self._js = self._client.jetstream()
        # Why the connection is not usable, as a result's (code, reason); None while it is.
        self._problem: tuple[str, str] | None = None
        # Set once the first connection attempt has an outcome (connected, or an error).
        self._first_try = asyncio.Event()
        self._logged = ""
        self._closing = False
        self._connecting = asyncio.create_task(self._connect(), name="nats-connect")

    async def _connect(self) -> None:
        try:
            # Tries forever (max_reconnect_attempts=-1), at first and after every loss, a
            # second apart; deliveries meanwhile fail at once with the last error (retried).
            await self._client.connect(
                servers=[self._url], name="relayq-router", allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=1, connect_timeout=5,
                error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_connected, tls=self._tls,
                tls_hostname=self._host if self._tls is not None else None)
        except Exception as exc:  # nats-py gives up only on what retrying cannot mend
            self._problem = ("config", f"{self._shown}: {type(exc).__name__}: {exc}")
            self._log(logging.ERROR, "cannot connect to NATS: %s", self._problem[1])
            self._first_try.set()
            return
        await self._on_connected()

    async def ready(self, wait: float) -> tuple[Client, JetStreamContext]:
        """The connection to publish on, or _Unreachable with the reason it is not up. Only
        the first connection attempt is waited for; later, a known problem fails at once."""
        if not self._first_try.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_try.wait(), wait)
            if not self._first_try.is_set():
                raise _Unreachable("timeout", f"not connected to {self._shown} within"
                                              f" {wait:g}s")
        if self._problem is not None:
            raise _Unreachable(*self._problem)
        return self._client, self._js

    async def _on_connected(self) -> None:
        # nats-py turns to TLS only when the server asks for it (tls_required in its INFO),
        # whatever the URL's scheme: a tls:// endpoint answered by a server that does not
        # ask gets nothing published over the plaintext connection.
        server_info = getattr(self._client, "_server_info", {})
        if self._tls is not None and not server_info.get("tls_required"):
            self._problem = ("tls", f"{self._shown} does not use TLS; a tls:// endpoint"
                                    " publishes only over TLS")
            self._log(logging.ERROR, "%s", self._problem[1])
        else:
            self._problem = None
            self._log(logging.INFO, "connected to NATS at %s", self._shown)
        self._first_try.set()

    async def _on_disconnected(self) -> None:
        if self._problem is None and not self._closing:
            self._problem = ("connection", f"the connection to {self._shown} was lost;"
                                           " reconnecting")
            self._log(logging.WARNING, "%s", self._problem[1])

    async def _on_error(self, exc: Exception) -> None:
        detail = f"{self._shown}: {type(exc).__name__}: {exc}"
        if self._client.is_connected:
            # An error the server reported on a working connection (a permissions
            # violation, say): the publish it concerns fails on its own.
            self._log(logging.WARNING, "NATS error: %s", detail)
            return
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            code = "tls"
        elif isinstance(exc, nats.errors.AuthorizationError):
            code = "nats:authorization"
        else:
            code = "connection"
        self._problem = (code, detail)
        self._log(logging.WARNING, "cannot reach NATS: %s", detail)
        self._first_try.set()

    def _log(self, level: int, message: str, detail: str) -> None:
        """Once per distinct state: a server down for an hour is tried 3,600 times."""
        if detail != self._logged:
            self._logged = detail
            log.log(level, message, detail, extra={"nats_server": self._shown})

    async def release(self) -> None:
        self._users -= 1
        if self._users > 0:
            return
        if _Server._open.get(self._key) is self:
            del _Server._open[self._key]
        self._closing = True
        self._connecting.cancel()
        await asyncio.gather(self._connecting, return_exceptions=True)
        await self._client.close()


def _safe(url: str) -> str:
    """The URL without credentials, for logs and job history."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
