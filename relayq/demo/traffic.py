"""The demo's sample events: a steady stream from a few shoppers, sent through Ingest.

Each user's events carry `properties.seq`, numbered per user, so the demo sink can check
that the router delivered every user's events in order even while it retried some.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections import Counter

import grpc
import orjson

from relayq.v1 import ingest_pb2, ingest_pb2_grpc

log = logging.getLogger("relayq.demo")

USERS = tuple(f"shopper-{n:02d}" for n in range(1, 21))
EVENTS = ("Page Viewed", "Page Viewed", "Product Viewed", "Product Added", "Order Completed")
TICK = 0.1


class Traffic:
    """Sends `rate` events a second, in a batch every 100 ms, until stopped."""

    def __init__(self, stub: ingest_pb2_grpc.IngestAsyncStub, write_key: str, rate: float) -> None:
        self._stub = stub
        self._auth = (("authorization", f"Bearer {write_key}"),)
        self._rate = rate
        self._run = secrets.token_hex(3)
        self._numbers = itertools.count(1)
        self._seq: Counter[str] = Counter()
        self._rng = random.Random()
        self.counts: Counter[str] = Counter()

    def _event(self) -> ingest_pb2.Event:
        number = next(self._numbers)
        user = self._rng.choice(USERS)
        self._seq[user] += 1
        name = self._rng.choice(EVENTS)
        properties: dict[str, object] = {"seq": self._seq[user], "run": self._run}
        if name == "Order Completed":
            properties.update(order_id=f"{self._run}-{number}",
                              revenue=round(self._rng.uniform(5, 250), 2))
        return ingest_pb2.Event(
            message_id=f"demo-{self._run}-{number}", user_id=user, type="track", event=name,
            payload_json=orjson.dumps(properties).decode())

    async def run(self, stop: asyncio.Event) -> None:
        owed = 0.0
        last = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            owed += (now - last) * self._rate
            last = now
            count = int(owed)
            if count:
                owed -= count
                await self._send([self._event() for _ in range(min(count, 1000))])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK)

    async def _send(self, events: list[ingest_pb2.Event]) -> None:
        try:
            response = await self._stub.Ingest(
                ingest_pb2.IngestRequest(events=events), metadata=self._auth, timeout=10)
        except grpc.aio.AioRpcError as exc:
            self.counts["errors"] += len(events)
            log.warning("demo traffic: Ingest failed: %s %s", exc.code().name, exc.details())
            return
        self.counts["sent"] += len(events)
        self.counts["accepted"] += response.accepted
        self.counts["duplicates"] += response.duplicates
        self.counts["rejected"] += response.rejected
