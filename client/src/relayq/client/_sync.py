"""Producer: the producer for ordinary (threaded) code.

It runs the same engine as AsyncProducer, on an event loop of its own in a daemon thread.
send() does its work in the caller's thread (checking and serialising the event, putting it
in its lane) and wakes the engine's thread only when a lane needs it, so a send costs a few
microseconds and usually no thread switch. flush() and close() run on the engine's loop and
wait for it. close() also runs at interpreter exit (atexit), so a script that forgets it
still delivers what it sent.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

from relayq.client.engine import Engine
from relayq.client.errors import BufferFull, ProducerClosed
from relayq.client.events import encode
from relayq.client.handles import Handle
from relayq.client.ids import MessageIds
from relayq.client.options import Options
from relayq.client.results import Counters, SendResult

T = TypeVar("T")


class Producer:
    """Sends events to relayq-ingest in batches, from any thread.

        with Producer(address="127.0.0.1:50051", write_key=key) as producer:
            handle = producer.send(user_id="alice", event="Signed Up")
            result = handle.result(timeout=30)   # SendResult

    send() returns a concurrent.futures.Future at once. Options: see
    relayq.client.options.Options.
    """

    def __init__(self, **options: Any) -> None:
        self.options = Options(**options)
        self._engine = Engine(self.options)
        self._ids = MessageIds()
        self._closed = False
        self._close_lock = threading.Lock()
        # Senders blocked on a full buffer wait here (when_full="block").
        self._space = threading.Condition()
        self._waiting = 0
        self._engine.on_space = self._room_freed
        self._loop = _new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name="relayq-producer", daemon=True)
        self._thread.start()
        started.wait()
        self._on_loop(self._engine.start()).result()
        atexit.register(self.close)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    def send(
        self, *, user_id: str | None = None, event: str | None = None,
        properties: Mapping[str, Any] | None = None, type: str | None = None,
        message_id: str | None = None, timestamp: datetime | str | None = None,
        context: Mapping[str, Any] | None = None, anonymous_id: str | None = None,
        destination_ids: Sequence[str] = (), traceparent: str | None = None,
    ) -> concurrent.futures.Future[SendResult]:
        """Queue one event; returns a future of ingest's answer for it.

        Raises InvalidEvent (nothing queued) for an event ingest would refuse, BufferFull,
        or ProducerClosed. message_id defaults to a new UUIDv7, kept through every retry.
        traceparent (W3C Trace Context) is kept with the event and sent on with its
        deliveries; None takes the current OpenTelemetry span's when opentelemetry-api is
        installed and a span is current, "" sends none.
        """
        encoded = encode(
            self._ids, message_id=message_id,
            user_id=user_id, anonymous_id=anonymous_id, event=event, type=type,
            properties=properties, context=context, timestamp=timestamp,
            destination_ids=destination_ids, max_event_bytes=self.options.max_event_bytes,
            traceparent=traceparent)
        handle: Handle[SendResult] = Handle(*encoded)
        if self._engine.submit(handle):
            return handle
        if self.options.when_full == "block":
            deadline = time.monotonic() + self.options.block_timeout
            with self._space:
                self._waiting += 1
                try:
                    # Tried again under the condition before each wait: room freed since
                    # the first try notified no one.
                    while not self._engine.submit(handle):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._space.wait(remaining)
                    else:
                        return handle
                finally:
                    self._waiting -= 1
        raise BufferFull(f"the producer's buffer is full ({self.options.buffer_events} events"
                         f" or {self.options.buffer_bytes} bytes)")

    def _room_freed(self) -> None:
        """On the engine's loop, after answers freed room: wake the senders waiting for it.
        Checked and notified under the condition a sender holds from its failed try to its
        wait, so no wake-up falls between them."""
        if self._waiting:
            with self._space:
                self._space.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything buffered now and wait for the answers; False if `timeout`
        (seconds) passed first. Events sent meanwhile are not waited for."""
        if self._closed:
            return self._engine.lanes.events == 0
        return self._on_loop(self._engine.flush(timeout)).result()

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to `timeout`), then stop the thread: what is still unanswered fails
        with ProducerClosed. Idempotent; also runs at interpreter exit."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._engine.lanes.close()
        with self._space:  # blocked senders wake to ProducerClosed
            self._space.notify_all()
        try:
            self._on_loop(self._engine.close(timeout)).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @property
    def counters(self) -> Counters:
        return self._engine.counters()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


# ProducerClosed is what send() raises after close(); re-exported for the type's users.
__all__ = ["Producer", "ProducerClosed"]


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's when it is installed (relayq-client[speedups]): the engine's loop is private
    to the producer, and libuv's costs less CPU per event. asyncio's own otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
