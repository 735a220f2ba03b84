"""What one webhook request costs the client: aiohttp's client (as the router used it before)
against the router's own (router_service/httpclient.py), CPU per request on the client side.

    .venv/bin/python bench/http_client.py [--requests 20000] [--in-flight 64] [--smoke]

Both send the same signed POST (a ~400-byte event, the headers the router sends) to the bench
sink (bench/sink.py, its own process, answering 200 at once) over kept-alive connections, on
uvloop, as the router does. CPU is this process's user + system time over the measured
requests (after a warm-up round that opens the connections); each client runs twice, alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port
from jobsdb.keys import new_signing_secret
from relayq.netpolicy import NetworkPolicy
from router_service.httpclient import HttpPool, parse_target
from router_service.resolver import Resolver
from router_service.signing import Signer

BODY = (b'{"messageId":"m-%d","type":"track","event":"Order Completed","userId":"user-42",'
        b'"timestamp":"2026-12-02T10:00:00Z","properties":{"order_id":"1001","revenue":42.5,'
        b'"currency":"EUR","items":[{"sku":"a-1","qty":2},{"sku":"b-7","qty":1}],'
        b'"note":"' + b"x" * 160 + b'"}}')

Send = Callable[[int], Awaitable[None]]


async def aiohttp_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
        headers={"User-Agent": "relayq"})
    timeout = aiohttp.ClientTimeout(total=30)
    base = {"Content-Type": "application/json"}
    signer = Signer([(new_signing_secret(), None)])

    async def send(n: int) -> None:
        body = BODY % n
        now = int(time.time())
        headers = {**base, "X-Relayq-Message-Id": f"m-{n}", "X-Relayq-Job-Id": str(n),
                   "X-Relayq-Attempt": "1", "webhook-id": f"msg_{n}",
                   "webhook-timestamp": str(now),
                   "webhook-signature": signer.signature(f"msg_{n}", now, body)}
        async with session.post(url, data=body, headers=headers, timeout=timeout,
                                allow_redirects=False) as response:
            if response.status != 200:
                await response.content.read(10_000)
                raise SystemExit(f"answered {response.status}")

    return send, session.close


async def own_client(url: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    pool = HttpPool(ssl.create_default_context(), body_limit=10_000,
                    # The sink is on loopback, which the network policy refuses by default.
                    resolver=Resolver(NetworkPolicy.parse("127.0.0.0/8,::1/128")))
    target = parse_target(url)
    fixed = (f"Host: {target.host_header}\r\nUser-Agent: relayq\r\n"
             "Content-Type: application/json\r\n")
    signer = Signer([(new_signing_secret(), None)])

    async def send(n: int) -> None:
        body = BODY % n
        now = int(time.time())
        head = (f"{fixed}X-Relayq-Message-Id: m-{n}\r\nX-Relayq-Job-Id: {n}\r\n"
                f"X-Relayq-Attempt: 1\r\nwebhook-id: msg_{n}\r\nwebhook-timestamp: {now}\r\n"
                f"webhook-signature: {signer.signature(f'msg_{n}', now, body)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        response = await pool.request(target, head, body, 30)
        if response.status != 200:
            raise SystemExit(f"answered {response.status}")

    return send, pool.close


async def measure(make: Callable[[str], Awaitable[tuple[Send, Callable[[], Awaitable[None]]]]],
                  url: str, requests: int, in_flight: int) -> tuple[float, float]:
    """(CPU µs per request, requests per second) over `requests` after a warm-up round."""
    send, close = await make(url)

    async def worker(start: int, count: int) -> None:
        for n in range(start, count, in_flight):
            await send(n)

    try:
        await asyncio.gather(*(worker(w, in_flight * 10) for w in range(in_flight)))
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(w, requests) for w in range(in_flight)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await close()
    return cpu / requests * 1e6, requests / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="2,000 requests, one round")
    args = parser.parse_args()
    requests, rounds = (2_000, 1) if args.smoke else (args.requests, 2)
    port = free_port()
    out = Path(tempfile.mkstemp(prefix="relayq-sink-")[1])
    sink = subprocess.Popen([sys.executable, str(Path(__file__).parent / "sink.py"),
                             "--kind", "webhook", "--port", str(port), "--out", str(out)])
    try:
        time.sleep(1.0)
        url = f"http://127.0.0.1:{port}/hook"
        print(f"client CPU per signed webhook request ({requests:,} requests,"
              f" {args.in_flight} in flight, kept-alive connections, uvloop):")
        for _ in range(rounds):
            for name, make in (("aiohttp", aiohttp_client), ("router_service.httpclient",
                                                             own_client)):
                cpu, rate = uvloop.run(measure(make, url, requests, args.in_flight))
                print(f"  {name:26s} {cpu:6.1f} µs CPU per request, {rate:8,.0f} requests/s")
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(30)
        out.unlink()


if __name__ == "__main__":
    main()
