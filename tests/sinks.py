"""Real destinations for tests: an HTTP webhook server and a relayq.v1.Destination gRPC server.

Both record every delivery they receive, in arrival order, and answer as a test scripts them
(`answer`: a function from the delivery to an outcome), so ordering, retries and aborts are
checked against what a destination actually saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from relayq.v1 import destination_pb2, destination_pb2_grpc
from tests.poll import eventually


@dataclass(frozen=True)
class Received:
    job_id: int
    message_id: str
    user_id: str
    attempt: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    # The request body as it arrived (webhooks): what a signature covers.
    raw: bytes = b""


@dataclass(frozen=True)
class Answer:
    """200 = success; other statuses as HTTP (or mapped to RETRY/ABORT for gRPC)."""

    status: int = 200
    retry_after: float | None = None
    delay: float = 0.0
    body: str = ""


OK = Answer()


@dataclass
class Recorder:
    received: list[Received] = field(default_factory=list)
    answer: Callable[[Received], Answer] = lambda _: OK
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, delivery: Received) -> Answer:
        self.received.append(delivery)
        self.arrived.set()
        return self.answer(delivery)

    async def wait_for(self, predicate: Callable[[], bool], within: float = 30.0) -> None:
        """Until `predicate` holds of what has arrived (checked again at each arrival)."""
        await eventually(predicate, within=within, every=0.5, woken_by=self.arrived,
                         what=lambda: f"condition on deliveries ({len(self.received)} so far)")


class WebhookSink(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.oks: list[Received] = []
        # Set on stop: answers still being delayed go out at once.
        self._release = asyncio.Event()
        # Deliveries of each user being answered right now, and the most ever seen at once:
        # above 1 means two deliveries of one ordering key overlapped.
        self._open: dict[str, int] = {}
        self.max_open_per_user = 0
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scheme = "http"
        # Deliveries whose sender went away before the answer (with cancel_on_disconnect).
        self.abandoned: list[Received] = []
        # The job ids of each request, in arrival order (one each unless batched).
        self.batches: list[list[int]] = []

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hook"

    async def start(self, tls: ssl.SSLContext | None = None, *,
                    cancel_on_disconnect: bool = False) -> None:
        """`cancel_on_disconnect`: a request whose sender closes the connection before the
        answer is not processed (counted in `abandoned`, never in `oks`), as a receiver that
        processes while it answers would behave."""
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None,
                                     handler_cancellation=cancel_on_disconnect)
        await self._runner.setup()
        self.scheme = "https" if tls is not None else "http"
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        headers = dict(request.headers)
        if isinstance(body, list):
            # A batch: a JSON array of documents, their job ids and attempts in headers.
            ids = [int(j) for j in request.headers["X-Relayq-Job-Ids"].split(",")]
            attempts = [int(a) for a in request.headers["X-Relayq-Attempts"].split(",")]
            deliveries = [Received(job_id, document["messageId"], _user(document), attempt,
                                   document, headers, raw)
                          for job_id, attempt, document in zip(ids, attempts, body, strict=True)]
        else:
            deliveries = [Received(
                job_id=int(request.headers["X-Relayq-Job-Id"]),
                message_id=request.headers["X-Relayq-Message-Id"],
                user_id=_user(body),
                attempt=int(request.headers["X-Relayq-Attempt"]),
                body=body,
                headers=headers,
                raw=raw,
            )]
        self.batches.append([d.job_id for d in deliveries])
        answers = [self.record(d) for d in deliveries]
        # One answer for the request: the first that is not a success, if any.
        answer = next((a for a in answers if a.status != 200), answers[0])
        users = {d.user_id for d in deliveries}
        for user in users:
            self._open[user] = self._open.get(user, 0) + 1
            self.max_open_per_user = max(self.max_open_per_user, self._open[user])
        try:
            delay = max(a.delay for a in answers)
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), delay)
        except asyncio.CancelledError:
            self.abandoned.extend(deliveries)
            raise
        finally:
            for user in users:
                self._open[user] -= 1
        if answer.status == 200:
            self.oks.extend(deliveries)
        headers = {"Retry-After": str(int(answer.retry_after))} if answer.retry_after else {}
        return web.Response(status=answer.status, text=answer.body, headers=headers)


def _user(document: dict[str, Any]) -> str:
    return str(document.get("userId") or document.get("anonymousId", ""))


class GrpcSink(Recorder, destination_pb2_grpc.DestinationServicer):
    """Answers per job: status 200 -> OK, 4xx other than 408/429 -> ABORT, else RETRY."""

    def __init__(self) -> None:
        Recorder.__init__(self)
        self.oks: list[Received] = []
        self.batches: list[list[int]] = []
        # Each delivery's Delivery.traceparent, by job id (the latest attempt's).
        self.traceparents: dict[int, str] = {}
        # What the sink does to its answers before sending them (None: nothing): reorder
        # them, leave some out.
        self.rearrange: Callable[[list[destination_pb2.DeliveryResult]],
                                 list[destination_pb2.DeliveryResult]] | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.scheme = ""

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}127.0.0.1:{self.port}"

    async def start(self, tls: grpc.ServerCredentials | None = None) -> None:
        self._server = grpc.aio.server()
        destination_pb2_grpc.add_DestinationServicer_to_server(self, self._server)
        if tls is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.scheme = "grpcs://"
            self.port = self._server.add_secure_port("127.0.0.1:0", tls)
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def Deliver(self, request: destination_pb2.DeliverRequest,
                      context: grpc.aio.ServicerContext[Any, Any]
                      ) -> destination_pb2.DeliverResponse:
        self.batches.append([d.job_id for d in request.deliveries])
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        results = []
        delay = 0.0
        for d in request.deliveries:
            self.traceparents[d.job_id] = d.traceparent
            delivery = Received(d.job_id, d.message_id, d.user_id, d.attempt,
                                json.loads(d.payload_json), metadata)
            answer = self.record(delivery)
            delay = max(delay, answer.delay)
            if answer.status == 200:
                outcome = destination_pb2.DeliveryResult.OK
                self.oks.append(delivery)
            elif 400 <= answer.status < 500 and answer.status not in (408, 429):
                outcome = destination_pb2.DeliveryResult.ABORT
            else:
                outcome = destination_pb2.DeliveryResult.RETRY
            results.append(destination_pb2.DeliveryResult(
                job_id=d.job_id, outcome=outcome, error=answer.body,
                retry_after_ms=int((answer.retry_after or 0) * 1000)))
        if delay:
            await asyncio.sleep(delay)
        if self.rearrange is not None:
            results = self.rearrange(results)
        return destination_pb2.DeliverResponse(results=results)


async def serve_post(path: str, handler: Any) -> tuple[web.AppRunner, int]:
    """A plain aiohttp server on loopback answering POSTs to `path`; (runner, port). The
    caller cleans the runner up."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
