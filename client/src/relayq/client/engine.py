"""The producer's engine, shared by Producer and AsyncProducer: batches to Ingest, retried.

It runs on one asyncio event loop: the caller's (AsyncProducer) or a background thread's
(Producer). send() may be called from any thread; it only encodes the event and puts it in
its lane (lanes.py). One task per lane then loops: take the lane's next batch (waiting up to
linger_ms for a batch to fill), send it, retry it until it is answered or given up, settle
every event's handle, and only then take the lane's next batch, which is what keeps each
user's events in send() order at ingest.

Every request is sent with partial_success: ingest then stores the valid events of a batch
and answers the invalid ones REJECTED with their reason, in one round trip, rather than
refusing the batch whole for one bad event. A batch refused whole all the same
(INVALID_ARGUMENT: a server whose limits are lower than this producer's, say) is split in
two and each half sent in order, down to single events, which are then REJECTED with the
server's message; so the good events of a batch always go.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from relayq.client.errors import DeliveryFailed, ProducerClosed
from relayq.client.events import PARTIAL_SUCCESS
from relayq.client.lanes import Item, Lanes, Offer
from relayq.client.options import Options
from relayq.client.results import Counters, SendResult, Status
from relayq.client.retry import RETRYABLE, Retryable, retry_after, waits
from relayq.v1 import ingest_pb2

log = logging.getLogger("relayq.client")

METHOD = "/relayq.v1.Ingest/Ingest"

_STATUSES = {
    ingest_pb2.EventResult.ACCEPTED: Status.ACCEPTED,
    ingest_pb2.EventResult.DUPLICATE: Status.DUPLICATE,
    ingest_pb2.EventResult.REJECTED: Status.REJECTED,
}
_SETTLED = (asyncio.InvalidStateError, concurrent.futures.InvalidStateError)


class _Expired(Exception):
    """The batch's oldest event ran out of delivery_timeout before it could be sent."""


class Engine:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.lanes = Lanes(options.in_flight, batch_events=options.batch_events,
                           batch_bytes=options.batch_bytes, buffer_events=options.buffer_events,
                           buffer_bytes=options.buffer_bytes)
        # Changed on the engine's loop only; `sent` lives in the lanes (any thread adds).
        self._counts = Counters()
        self._metadata = (("authorization", f"Bearer {options.write_key}"),)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wakes: list[asyncio.Event] = []
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The batch each lane is working on, and how many of its events are settled: what
        # close() must fail if it cancels the lane mid-batch.
        self._current: list[list[Item]] = [[] for _ in range(options.in_flight)]
        self._settled = [0] * options.in_flight
        self._flushing = 0
        self._closing = False
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        # Called on the loop whenever room is freed in the buffer, for senders waiting in
        # other threads (Producer); AsyncProducer's senders wait on `_space` instead.
        self.on_space: Callable[[], None] | None = None

    # ---- life ----

    async def start(self) -> None:
        """Open the channel and start the lanes, on the running loop (which runs them)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wakes = [asyncio.Event() for _ in range(len(self.lanes))]
        self._channel = _channel(self.options)
        # Requests are sent as the bytes the lanes joined: no serializer.
        self._call = self._channel.unary_unary(
            METHOD, request_serializer=None,
            response_deserializer=ingest_pb2.IngestResponse.FromString)
        self._tasks = [asyncio.create_task(self._lane(lane), name=f"relayq-producer-lane-{lane}")
                       for lane in range(len(self.lanes))]

    async def close(self, within: float | None) -> None:
        """Refuse new events, send what is buffered (waiting up to `within` s), then fail what
        is still unanswered with ProducerClosed and close the channel."""
        if self._closing:
            return
        self._closing = True
        self.lanes.close()
        if self._tasks and not await self.flush(within):
            log.warning("relayq producer closing with events unacknowledged after %ss",
                        within, extra={"unacknowledged": self.lanes.events})
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        error = ProducerClosed("the producer was closed before ingest acknowledged the event")
        for lane in range(len(self.lanes)):
            left = self._current[lane][self._settled[lane]:] + self.lanes.drain(lane)
            self._current[lane] = []
            if left:
                self._fail(lane, left, error)
        if self._channel is not None:
            await self._channel.close(None)

    # ---- taking events (any thread) ----

    def submit(self, item: Item) -> bool:
        """Put an event in its lane; False when the buffer has no room for it."""
        item.at = time.monotonic()
        lane = self.lanes.lane_of(item.key)
        offer = self.lanes.offer(lane, item)
        if offer is Offer.FULL:
            return False
        if offer is Offer.WAKE:
            wake = self._wakes[lane]
            if threading.get_ident() == self._loop_thread:
                wake.set()
            else:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(wake.set)
        return True

    async def wait_for_space(self, size: int, within: float) -> bool:
        """Wait until the buffer has room for `size` bytes more; False after `within` s.

        Room is freed only on this loop, so checking and then waiting here loses no wake-up.
        """
        deadline = time.monotonic() + within
        while not self.lanes.fits(size):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing:
                return False
            self._space.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._space.wait(), remaining)
        return True

    async def flush(self, within: float | None) -> bool:
        """Wait until every event sent before this call is answered or given up; lingering
        batches go at once. False if `within` seconds passed first."""
        marks = self.lanes.marks()
        self._flushing += 1
        for wake in self._wakes:
            wake.set()
        deadline = None if within is None else time.monotonic() + within
        try:
            while not self.lanes.reached(marks):
                self._progress.clear()
                if deadline is None:
                    await self._progress.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), remaining)
            return True
        finally:
            self._flushing -= 1

    def counters(self) -> Counters:
        return dataclasses.replace(self._counts, sent=self.lanes.taken)

    # ---- one lane ----

    async def _lane(self, lane: int) -> None:
        wake = self._wakes[lane]
        linger = self.options.linger_ms / 1000
        while True:
            wake.clear()
            batch = self.lanes.next_batch(lane, time.monotonic(), linger,
                                          force=self._flushing > 0 or self._closing)
            if batch is None:
                await wake.wait()
            elif isinstance(batch, float):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), batch)
            else:
                self._current[lane], self._settled[lane] = batch, 0
                try:
                    await self._deliver(lane, batch)
                except Exception as exc:  # a bug here must not leave handles unresolved
                    log.exception("relayq producer: sending a batch failed unexpectedly")
                    self._fail(lane, batch[self._settled[lane]:],
                               DeliveryFailed(f"the producer failed: {exc!r}"))
                self._current[lane] = []

    async def _deliver(self, lane: int, batch: list[Item]) -> None:
        parts = deque([batch])
        while parts:
            part = parts.popleft()
            try:
                response = await self._attempts(part)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code == grpc.StatusCode.INVALID_ARGUMENT and len(part) > 1:
                    half = len(part) // 2
                    parts.extendleft((part[half:], part[:half]))
                    continue
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    self._settle(lane, part, [SendResult(
                        part[0].message_id, Status.REJECTED, reason=details)])
                    continue
                log.error("relayq producer: ingest refused %d events: %s: %s", len(part),
                          code.name, details, extra={"code": code.name, "events": len(part)})
                self._fail(lane, part, DeliveryFailed(f"{code.name}: {details}", code=code,
                                                      attempts=1))
            except Retryable as exc:
                attempts = exc.attempts
                log.error("relayq producer: giving up on %d events after %d tries: %s",
                          len(part), attempts, exc, extra={"code": exc.code.name})
                self._fail(lane, part, DeliveryFailed(
                    f"no acknowledgement after {attempts} tries: {exc}", code=exc.code,
                    attempts=attempts))
            except _Expired:
                self._fail(lane, part, DeliveryFailed(
                    f"delivery_timeout ({self.options.delivery_timeout:g}s) passed before the"
                    " event could be sent"))
            else:
                results = response.results
                if len(results) != len(part):
                    self._fail(lane, part, DeliveryFailed(
                        f"ingest answered {len(results)} results for {len(part)} events"))
                    continue
                self._answered(lane, part, response)

    async def _attempts(self, items: list[Item]) -> ingest_pb2.IngestResponse:
        """Send one batch, retrying what is worth retrying (retry.py) with its waits, until
        an answer, a failure not worth retrying (AioRpcError), or the retries or the time
        run out (the last Retryable)."""
        options = self.options
        request = b"".join([item.frame for item in items]) + PARTIAL_SUCCESS
        deadline = items[0].at + options.delivery_timeout  # items[0] is the oldest
        start = time.monotonic()
        if deadline <= start:
            raise _Expired
        max_tries = None if options.max_retries is None else options.max_retries + 1
        max_time = deadline - start
        wait = waits(options.backoff_min, options.backoff_max)
        wait.send(None)
        tries = 0
        while True:
            tries += 1
            elapsed = time.monotonic() - start
            timeout = min(options.call_timeout, max(0.001, deadline - time.monotonic()))
            try:
                response: ingest_pb2.IngestResponse = await self._call(
                    request, metadata=self._metadata, timeout=timeout)
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in RETRYABLE:
                    raise
                failure = Retryable(code, exc.details() or "", retry_after(exc), tries)
            # A wait the server asks for that outlasts the deadline: no point waiting.
            too_late = (failure.retry_after is not None
                        and time.monotonic() + failure.retry_after > deadline)
            if too_late or tries == max_tries or elapsed >= max_time:
                raise failure
            seconds = min(wait.send(failure), max_time - elapsed)
            self._retrying(items, failure, seconds)
            await asyncio.sleep(seconds)

    def _retrying(self, items: list[Item], failure: Retryable, seconds: float) -> None:
        self._counts.retried += len(items)
        # The first retry of a batch is worth a warning; the rest of the same outage would
        # only repeat it.
        level = logging.WARNING if failure.attempts == 1 else logging.DEBUG
        log.log(level, "relayq producer: %s; retrying %d events in %.2fs (try %d)",
                failure, len(items), seconds, failure.attempts + 1,
                extra={"code": failure.code.name, "events": len(items),
                       "wait_seconds": round(seconds, 3)})

    # ---- answers ----

    def _answered(self, lane: int, items: list[Item],
                  response: ingest_pb2.IngestResponse) -> None:
        """Resolve a batch's handles from ingest's answer: the hot path, one pass per event
        (try/except rather than contextlib.suppress: free when nothing is raised)."""
        counts = self._counts
        counts.batches += 1
        counts.accepted += response.accepted
        counts.duplicate += response.duplicates
        counts.rejected += response.rejected
        statuses = _STATUSES
        for item, answer in zip(items, response.results, strict=True):
            result = SendResult(item.message_id, statuses.get(answer.status, Status.REJECTED),
                                answer.event_id, answer.reason)
            future: Any = item.handle or item
            try:  # noqa: SIM105 - suppress() would cost a context manager per event
                future.set_result(result)
            except _SETTLED:  # the caller cancelled its handle
                pass
        self._release(lane, items)

    def _settle(self, lane: int, items: list[Item], results: list[SendResult]) -> None:
        counts = self._counts
        for item, result in zip(items, results, strict=True):
            status = result.status
            if status is Status.ACCEPTED:
                counts.accepted += 1
            elif status is Status.DUPLICATE:
                counts.duplicate += 1
            else:
                counts.rejected += 1
            future: Any = item.handle or item
            with contextlib.suppress(*_SETTLED):  # the caller cancelled its handle
                future.set_result(result)
        self._release(lane, items)

    def _fail(self, lane: int, items: list[Item], error: Exception) -> None:
        self._counts.dropped += len(items)
        for item in items:
            handle: Any = item.handle or item
            with contextlib.suppress(*_SETTLED):
                handle.set_exception(error)
                # Fire-and-forget senders never look at their handles; asyncio would log
                # "exception was never retrieved" for each. The failure is logged here once.
                handle.exception()
        self._release(lane, items)

    def _release(self, lane: int, items: list[Item]) -> None:
        self._settled[lane] += len(items)
        self.lanes.resolved(lane, items)
        self._space.set()
        self._progress.set()
        if self.on_space is not None:
            self.on_space()


def _channel(options: Options) -> grpc.aio.Channel:
    # gRPC's own reconnect backoff (1 s growing to 120 s by default) would keep the channel
    # down long after ingest is back; bound it by the producer's backoff instead.
    settings = [("grpc.initial_reconnect_backoff_ms", int(options.backoff_min * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(options.backoff_min * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(options.backoff_max * 1000))]
    if not options.uses_tls:
        return grpc.aio.insecure_channel(options.address, options=settings)
    roots = Path(options.ca_file).read_bytes() if options.ca_file is not None else None
    return grpc.aio.secure_channel(
        options.address, grpc.ssl_channel_credentials(root_certificates=roots), options=settings)
