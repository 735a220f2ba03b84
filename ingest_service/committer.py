"""Group commit: the events of many concurrent RPCs go into Postgres in one COPY and one commit.

A commit costs the same for one row or thousands, so sharing it is what lets throughput not
depend on how well each client batches. A flush starts when a flush slot is free and either the
oldest waiting request has waited `delay` or `max_jobs` jobs are waiting. Under load the slots
are busy, requests pile up meanwhile, and flushes grow by themselves; when idle, a request
waits at most `delay`. Every request learns its outcome only after the commit (or the failure)
of the flush that carried it.

When Postgres refuses a flush for its data (validation should have caught it; this is the
second line), no other request pays more than one retry: the refused events are found by
parsing the flush's documents half by half (`probe`, which stores nothing), their requests are
answered EventsRefused naming them, and the others are stored together once more. When no
document is to blame, each request is stored on its own, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from jobsdb import errors as dberrors
from jobsdb.ingest import NewEvent, Stored
from relayq.logs import Throttled

log = logging.getLogger(__name__)

StoreFn = Callable[[Sequence[NewEvent]], Awaitable[list[Stored]]]
# Positions (in the sequence given) of the events Postgres would refuse, with its reason.
ProbeFn = Callable[[Sequence[NewEvent]], Awaitable[dict[int, str]]]

class EventsRefused(dberrors.ConstraintViolation):
    """Postgres refused events of this request; nothing of the request was stored."""

    def __init__(self, refused: dict[int, str]) -> None:
        first, reason = next(iter(refused.items()))
        super().__init__(f"event {first}: {reason}")
        # Position in the submitted events -> why Postgres refused it.
        self.refused = refused


async def _nothing_to_blame(events: Sequence[NewEvent]) -> dict[int, str]:
    return {}


@dataclass(slots=True)
class _Request:
    events: Sequence[NewEvent]
    jobs: int
    future: asyncio.Future[list[Stored]]
    queued_at: float


class GroupCommitter:
    def __init__(
        self,
        store: StoreFn,
        *,
        delay: float,
        max_jobs: int,
        concurrency: int,
        on_flushed: Callable[[int, float], None] = lambda jobs, seconds: None,
        probe: ProbeFn = _nothing_to_blame,
    ) -> None:
        self._store = store
        self._probe = probe
        # One line per interval however many flushes clients' bad data makes Postgres refuse.
        self._refusals = Throttled(log, 10.0)
        self._delay = delay
        self._max_jobs = max_jobs
        self._slots = asyncio.Semaphore(concurrency)
        self._on_flushed = on_flushed
        self._queue: deque[_Request] = deque()
        self._queued_jobs = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._flushes: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="group-commit")

    async def submit(self, events: Sequence[NewEvent]) -> list[Stored]:
        """Store `events` in some upcoming flush; returns after that flush commits."""
        if self._closing:
            raise dberrors.DatabaseUnavailable("ingest is shutting down")
        future: asyncio.Future[list[Stored]] = asyncio.get_running_loop().create_future()
        # An event with no destination still claims its message id: it counts as one row.
        jobs = sum(max(1, len(e.destination_keys)) for e in events)
        self._queue.append(_Request(events, jobs, future, time.monotonic()))
        self._queued_jobs += jobs
        self._arrived.set()
        if self._queued_jobs >= self._max_jobs:
            self._full.set()
        return await future

    async def close(self) -> None:
        """Flush what is queued, wait for every flush in flight, stop."""
        self._closing = True
        self._full.set()
        self._arrived.set()
        if self._runner is not None:
            await self._runner
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._arrived.wait()
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                continue
            await self._slots.acquire()
            wait = self._queue[0].queued_at + self._delay - time.monotonic() if self._queue else 0
            if wait > 0 and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), wait)
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._flush(batch), name="group-commit-flush")
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _take(self) -> list[_Request]:
        taken: list[_Request] = []
        jobs = 0
        while self._queue and (not taken or jobs + self._queue[0].jobs <= self._max_jobs):
            request = self._queue.popleft()
            taken.append(request)
            jobs += request.jobs
        self._queued_jobs -= jobs
        if self._queued_jobs < self._max_jobs and not self._closing:
            self._full.clear()
        if not self._queue and not self._closing:
            self._arrived.clear()
        return taken

    async def _flush(self, batch: list[_Request]) -> None:
        try:
            started = time.perf_counter()
            await self._flush_together(batch)
            self._on_flushed(sum(r.jobs for r in batch), time.perf_counter() - started)
        finally:
            self._slots.release()

    async def _flush_together(self, batch: list[_Request]) -> None:
        events = [event for request in batch for event in request.events]
        try:
            stored = await self._store(events)
        except dberrors.DatabaseUnavailable as exc:
            _fail(batch, exc)
            return
        except dberrors.JobsDBError as exc:
            await self._after_refusal(batch, events, exc)
            return
        _answer(batch, stored)

    async def _after_refusal(self, batch: list[_Request], events: list[NewEvent],
                             exc: dberrors.JobsDBError) -> None:
        """Answer the requests whose events Postgres refused; store each other one once more."""
        try:
            blamed = await self._probe(events)
        except dberrors.JobsDBError:
            blamed = {}
        innocent: list[_Request] = []
        offset = 0
        for request in batch:
            mine = {i - offset: reason for i, reason in blamed.items()
                    if offset <= i < offset + len(request.events)}
            offset += len(request.events)
            if mine:
                request.future.set_exception(EventsRefused(mine))
            else:
                innocent.append(request)
        if not blamed and len(batch) == 1:
            _fail(batch, exc)
            return
        self._refusals.warning("Postgres refused a group commit of %d requests (%s); %d named as"
                          " refused, the others stored again", len(batch), exc,
                          len(batch) - len(innocent))
        if blamed:
            if innocent:
                await self._store_once(innocent)
        else:
            # Nothing in the documents to blame: each request on its own, once.
            for request in batch:
                await self._store_once([request])

    async def _store_once(self, batch: list[_Request]) -> None:
        try:
            stored = await self._store([event for request in batch for event in request.events])
        except dberrors.JobsDBError as exc:
            _fail(batch, exc)
            return
        _answer(batch, stored)


def _answer(batch: list[_Request], stored: list[Stored]) -> None:
    offset = 0
    for request in batch:
        if not request.future.done():
            request.future.set_result(stored[offset:offset + len(request.events)])
        offset += len(request.events)


def _fail(batch: list[_Request], exc: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)
