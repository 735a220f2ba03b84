"""AsyncProducer: the producer for asyncio code, running its engine on the caller's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

from relayq.client.engine import Engine
from relayq.client.errors import BufferFull, ProducerClosed
from relayq.client.events import encode
from relayq.client.ids import MessageIds
from relayq.client.lanes import Item
from relayq.client.options import Options
from relayq.client.results import Counters, SendResult


class AsyncProducer:
    """Sends events to relayq-ingest in batches, from asyncio code.

        async with AsyncProducer(address="127.0.0.1:50051", write_key=key) as producer:
            handle = await producer.send(user_id="alice", event="Signed Up")
            result = await handle          # SendResult: accepted, duplicate or rejected

    `await send(...)` returns once the event is in the buffer (waiting for room if it is
    full and when_full="block"); awaiting the returned future waits for ingest's answer.
    Options: see relayq.client.options.Options. Close it (or use `async with`): an asyncio
    producer cannot flush at interpreter exit, when its loop is gone.
    """

    def __init__(self, **options: Any) -> None:
        self.options = Options(**options)
        self._engine = Engine(self.options)
        self._ids = MessageIds()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Connect and start the lanes (send() does it on first use)."""
        if self._closed:
            raise ProducerClosed("the producer is closed")
        if not self._started:
            self._started = True
            await self._engine.start()

    async def send(
        self, *, user_id: str | None = None, event: str | None = None,
        properties: Mapping[str, Any] | None = None, type: str | None = None,
        message_id: str | None = None, timestamp: datetime | str | None = None,
        context: Mapping[str, Any] | None = None, anonymous_id: str | None = None,
        destination_ids: Sequence[str] = (), traceparent: str | None = None,
    ) -> asyncio.Future[SendResult]:
        """Queue one event; returns a future of ingest's answer for it.

        Raises InvalidEvent (nothing queued) for an event ingest would refuse, BufferFull,
        or ProducerClosed. message_id defaults to a new UUIDv7, kept through every retry.
        traceparent (W3C Trace Context) is kept with the event and sent on with its
        deliveries; None takes the current OpenTelemetry span's when opentelemetry-api is
        installed and a span is current, "" sends none.
        """
        if not self._started:
            await self.start()
        encoded = encode(
            self._ids, message_id=message_id,
            user_id=user_id, anonymous_id=anonymous_id, event=event, type=type,
            properties=properties, context=context, timestamp=timestamp,
            destination_ids=destination_ids, max_event_bytes=self.options.max_event_bytes,
            traceparent=traceparent)
        handle: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        item = Item(*encoded, handle)
        while not self._engine.submit(item):
            if self.options.when_full == "raise" or not await self._engine.wait_for_space(
                    len(item.frame), self.options.block_timeout):
                raise BufferFull(f"the producer's buffer is full ({self.options.buffer_events}"
                                 f" events or {self.options.buffer_bytes} bytes)")
        return handle

    # `timeout`, as in Producer.flush(timeout): the one API for both.
    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Send everything buffered now and wait for the answers; False if `timeout`
        (seconds) passed first. Events sent meanwhile are not waited for."""
        if not self._started:
            return True
        return await self._engine.flush(timeout)

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Flush (up to `timeout`), then stop: what is still unanswered fails with
        ProducerClosed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._engine.lanes.close()
        if self._started:
            await self._engine.close(timeout)

    @property
    def counters(self) -> Counters:
        return self._engine.counters()

    async def __aenter__(self) -> AsyncProducer:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()
