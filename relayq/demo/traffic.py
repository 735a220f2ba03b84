"""The demo's sample events: a steady stream from a few shoppers, sent with AsyncProducer.

It uses relayq.client as any service would: send() per event, the producer batches and
retries. Each user's events carry `properties.seq`, numbered per user, so the demo sink can
check that they were delivered in order even while the router retried some.
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

from relayq.client import AsyncProducer, BufferFull

log = logging.getLogger("relayq.demo")

USERS = tuple(f"shopper-{n:02d}" for n in range(1, 21))
EVENTS = ("Page Viewed", "Page Viewed", "Product Viewed", "Product Added", "Order Completed")
TICK = 0.1


class Traffic:
    """Sends `rate` events a second, a tick's worth every 100 ms, until stopped."""

    def __init__(self, address: str, write_key: str, rate: float) -> None:
        self._address = address
        self._write_key = write_key
        self._rate = rate
        self._run = secrets.token_hex(3)
        self._numbers = itertools.count(1)
        self._seq: Counter[str] = Counter()
        self._rng = random.Random()
        self._producer: AsyncProducer | None = None

    @property
    def counts(self) -> dict[str, int]:
        """What the live view shows: the producer's counters."""
        if self._producer is None:
            return {}
        c = self._producer.counters
        return {"sent": c.sent, "accepted": c.accepted, "duplicates": c.duplicate,
                "rejected": c.rejected, "errors": c.dropped}

    async def _send_one(self, producer: AsyncProducer) -> None:
        number = next(self._numbers)
        user = self._rng.choice(USERS)
        self._seq[user] += 1
        name = self._rng.choice(EVENTS)
        properties: dict[str, object] = {"seq": self._seq[user], "run": self._run}
        if name == "Order Completed":
            properties.update(order_id=f"{self._run}-{number}",
                              revenue=round(self._rng.uniform(5, 250), 2))
        await producer.send(user_id=user, type="track", event=name, properties=properties,
                            context={"library": {"name": "relayq-demo"}})

    async def run(self, stop: asyncio.Event) -> None:
        # A short delivery timeout: a demo that lost ingest should say so within seconds.
        async with AsyncProducer(address=self._address, write_key=self._write_key,
                                 delivery_timeout=30, when_full="raise") as producer:
            self._producer = producer
            owed = 0.0
            last = time.monotonic()
            while not stop.is_set():
                now = time.monotonic()
                owed += (now - last) * self._rate
                last = now
                count = int(owed)
                owed -= count
                try:
                    for _ in range(min(count, 1000)):
                        await self._send_one(producer)
                except BufferFull:
                    log.warning("demo traffic: the producer's buffer is full; is ingest up?")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK)
            await producer.flush(5)
