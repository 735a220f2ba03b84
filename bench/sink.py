"""A destination for benchmarks: answers every delivery at once and notes when each arrived.

    python bench/sink.py --kind grpc|webhook --port PORT --out FILE

Runs until SIGTERM, then writes one line per delivery to FILE: message id and arrival time
(time.time()), so the benchmark can compute end-to-end latencies on the same clock.
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
import orjson
from aiohttp import web

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
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            arrivals.note(request.headers.get("X-Relayq-Message-Id")
                          or orjson.loads(body)["messageId"], time.time())
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        await stop.wait()
        await runner.cleanup()
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
