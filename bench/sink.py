"""A destination for benchmarks: answers every delivery at once and notes when each arrived.

    python bench/sink.py --kind grpc|webhook --port PORT --out FILE

Runs until SIGTERM, then writes one line per delivery to FILE: message id and arrival time
(time.time()), so the benchmark can compute end-to-end latencies on the same clock.

The webhook sink is a bare HTTP/1.1 server (asyncio protocol, httptools parsing requests):
on this 2-core machine the sink shares the cores with the router and Postgres, and aiohttp's
server cost ~100 us of CPU per request, taken from the router it measures. This one costs a
tenth of that; every router version is measured against the same sink.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httptools
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relayq.v1 import destination_pb2, destination_pb2_grpc

OK = destination_pb2.DeliveryResult.OK


class Arrivals:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def note(self, message_id: str, when: float) -> None:
        self.lines.append(b"%s %.6f\n" % (message_id.encode(), when))


class GrpcSink(destination_pb2_grpc.DestinationServicer):
    def __init__(self, arrivals: Arrivals) -> None:
        self.arrivals = arrivals

    async def Deliver(self, request: destination_pb2.DeliverRequest,
                      context: grpc.aio.ServicerContext[Any, Any]
                      ) -> destination_pb2.DeliverResponse:
        now = time.time()
        results = []
        for delivery in request.deliveries:
            self.arrivals.note(delivery.message_id, now)
            results.append(destination_pb2.DeliveryResult(job_id=delivery.job_id, outcome=OK))
        return destination_pb2.DeliverResponse(results=results)


class WebhookSink(asyncio.Protocol):
    """One connection: every request is answered 200 at once, keep-alive as the client asks."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def __init__(self, arrivals: Arrivals) -> None:
        self.arrivals = arrivals
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.message_id = ""
        self.body: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-relayq-message-id":
            self.message_id = value.decode()

    def on_body(self, body: bytes) -> None:
        if not self.message_id:
            self.body.append(body)

    def on_message_complete(self) -> None:
        now = time.time()
        if self.message_id:
            self.arrivals.note(self.message_id, now)
        else:
            document = orjson.loads(b"".join(self.body))
            # A batch is an array of event documents, each with its messageId.
            for event in document if isinstance(document, list) else [document]:
                self.arrivals.note(event["messageId"], now)
        self.message_id, self.body = "", []
        self.transport.write(self.OK)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(kind: str, port: int, out: Path) -> None:
    arrivals = Arrivals()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "grpc":
        server = grpc.aio.server()
        destination_pb2_grpc.add_DestinationServicer_to_server(GrpcSink(arrivals), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await stop.wait()
        await server.stop(0)
    else:
        http = await loop.create_server(lambda: WebhookSink(arrivals), "127.0.0.1", port,
                                        backlog=1024)
        await stop.wait()
        http.close()
    out.write_bytes(b"".join(arrivals.lines))  # noqa: ASYNC240 (once, after serving)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("grpc", "webhook"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.kind, args.port, args.out))


if __name__ == "__main__":
    main()
