"""The demo's webhook destination: one healthy endpoint and one flaky one, in one process.

    python -m relayq.demo.sink --port 8090 [--error-rate 0.2] [--reject-rate 0.005]

POST /healthy answers 200. POST /flaky answers 500 to a share of deliveries (retried by the
router, which holds that user's later events behind the failed one: the ordering barrier) and
422 to a small share (not retryable: the job is aborted, which releases the barrier).

Both check the order the router promises: every demo event carries the user's sequence
number, and a delivery answered 2xx whose number is below one already answered for the same
user and endpoint counts as out of order. GET /stats returns the counts as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from collections import Counter
from dataclasses import dataclass, field

import orjson
from aiohttp import web

ENDPOINTS = ("healthy", "flaky")


@dataclass
class Endpoint:
    """What one endpoint answered, and the highest sequence number it accepted per user."""

    error_rate: float
    reject_rate: float
    counts: Counter[str] = field(default_factory=Counter)
    highest: dict[str, int] = field(default_factory=dict)

    def answer(self, body: bytes, rng: random.Random) -> int:
        self.counts["received"] += 1
        draw = rng.random()
        if draw < self.reject_rate:
            self.counts["rejected"] += 1
            return 422
        if draw < self.reject_rate + self.error_rate:
            self.counts["failed"] += 1
            return 500
        self.counts["delivered"] += 1
        self._check_order(body)
        return 200

    def _check_order(self, body: bytes) -> None:
        try:
            event = orjson.loads(body)
            properties = event["properties"]
            # Per run of the traffic too: a new run numbers from 1 again, while jobs of an
            # earlier run may still be arriving.
            user = f"{properties.get('run', '')}/{event['userId']}"
            seq = int(properties["seq"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return  # not a demo event (someone trying grpcurl): nothing to check
        last = self.highest.get(user, -1)
        if seq < last:
            self.counts["out_of_order"] += 1
        elif seq == last:
            self.counts["redelivered"] += 1
        else:
            self.highest[user] = seq


def build_app(error_rate: float, reject_rate: float, seed: int | None = None) -> web.Application:
    rng = random.Random(seed)
    endpoints = {
        "healthy": Endpoint(0.0, 0.0),
        "flaky": Endpoint(error_rate, reject_rate),
    }

    async def deliver(request: web.Request) -> web.Response:
        endpoint = endpoints[request.match_info["name"]]
        status = endpoint.answer(await request.read(), rng)
        if status == 500:
            return web.Response(status=500, text="demo: simulated failure, try again")
        if status == 422:
            return web.Response(status=422, text="demo: simulated permanent rejection")
        return web.Response(status=status)

    async def stats(_: web.Request) -> web.Response:
        body = {name: dict(endpoint.counts) for name, endpoint in endpoints.items()}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_post(r"/{name:healthy|flaky}", deliver)
    app.router.add_get("/stats", stats)
    return app


async def serve(host: str, port: int, error_rate: float, reject_rate: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(error_rate, reject_rate), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="relayq-demo-sink", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--error-rate", type=float, default=0.2,
                        help="share of /flaky deliveries answered 500 (default 0.2)")
    parser.add_argument("--reject-rate", type=float, default=0.005,
                        help="share of /flaky deliveries answered 422 (default 0.005)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.error_rate, args.reject_rate))


if __name__ == "__main__":
    main()
