"""Group commit: the events of many concurrent RPCs go into Postgres in one statement and one
commit.

A commit costs the same for one row or thousands, so sharing it is what lets throughput not
depend on how well each client batches. A flush starts when a flush slot is free and either
nothing is being flushed (an idle ingest commits a request at once: waiting could only add
latency), the oldest waiting request has waited `delay`, or `max_jobs` jobs are waiting.
Under load the slots are busy, requests pile up meanwhile, and flushes grow by themselves.
Every request learns its outcome only after the commit (or the failure) of the flush that
carried it.

Fairness between sources: a flood from one source must not make another wait behind it.
Requests wait in turns by source (a flush takes one request of each source that has any, then
again), so a source's request is in the next flush however many another has queued. And a
*light* request (its source has nothing else queued or being flushed, and it carries at most
`light_max_jobs` jobs: a service sending now and then) goes to an express slot of its own,
which flushes light requests only: it neither waits for a general slot behind other sources'
flushes of thousands of jobs nor shares one. A source that sends more than that is not light;
its requests keep their order (one that was waiting as light moves ahead of the rest of its
source), as flushes of one source start in the order its requests came.

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
    # The source whose write key sent it (every event of a request has the same).
    source: int
    taken: bool = False


class _Queue:
    """Requests waiting for a flush, taken in turns by source: one request from each source
    that has any, then again, so a source with a thousand requests queued puts one of them
    ahead of another source's first, not a thousand."""

    def __init__(self) -> None:
        # Insertion order is the turn order; a source that was served goes to the back.
        self._by_source: dict[int, deque[_Request]] = {}
        self.jobs = 0

    def __bool__(self) -> bool:
        return bool(self._by_source)

    def push(self, request: _Request) -> None:
        self._by_source.setdefault(request.source, deque()).append(request)
        self.jobs += request.jobs

    def push_front(self, request: _Request) -> None:
        waiting = self._by_source.pop(request.source, deque())
        waiting.appendleft(request)
        # Back in its turn, and first in it: it was submitted before the rest of its source.
        self._by_source = {request.source: waiting, **self._by_source}
        self.jobs += request.jobs

    def take(self, max_jobs: int) -> list[_Request]:
        """At least one request, then more in turns while they fit in max_jobs."""
        taken: list[_Request] = []
        jobs = 0
        while self._by_source:
            source, waiting = next(iter(self._by_source.items()))
            request = waiting[0]
            if taken and jobs + request.jobs > max_jobs:
                break
            waiting.popleft()
            del self._by_source[source]
            if waiting:
                self._by_source[source] = waiting
            request.taken = True
            taken.append(request)
            jobs += request.jobs
        self.jobs -= jobs
        return taken


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
        light_max_jobs: int = 100,
    ) -> None:
        self._store = store
        self._probe = probe
        # One line per interval however many flushes clients' bad data makes Postgres refuse.
        self._refusals = Throttled(log, 10.0)
        self._delay = delay
        self._max_jobs = max_jobs
        self._light_max_jobs = light_max_jobs
        self._on_flushed = on_flushed
        # Requests of sources with nothing else outstanding (light), by source, in arrival
        # order, and all the others in turns by source.
        self._light: dict[int, _Request] = {}
        self._light_jobs = 0
        self._queue = _Queue()
        # Requests queued or being flushed, per source.
        self._outstanding: dict[int, int] = {}
        # Every request in arrival order, taken ones dropped lazily: the oldest waiting one
        # (the flush delay counts from it) without a scan of the sources.
        self._arrivals: deque[_Request] = deque()
        self._free = concurrency
        self._slots = concurrency
        # The express slot flushes light requests only: one never waits for a slot behind
        # other sources' flushes, nor shares a flush with their thousands of jobs.
        self._express_free = 1 if light_max_jobs > 0 else 0
        self._wake = asyncio.Event()
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
        # One row per event, whatever is connected (the log is written once).
        jobs = len(events)
        source = events[0].source_key if events else -1
        request = _Request(events, jobs, future, time.monotonic(), source)
        outstanding = self._outstanding.get(source, 0)
        self._outstanding[source] = outstanding + 1
        if outstanding == 0 and jobs <= self._light_max_jobs:
            self._light[source] = request
            self._light_jobs += jobs
        else:
            earlier = self._light.pop(source, None)
            if earlier is not None:
                # Not light after all: its source sends more. It goes first among them, so a
                # source's requests still start flushing in the order they came.
                self._light_jobs -= earlier.jobs
                self._queue.push_front(earlier)
            self._queue.push(request)
        self._arrivals.append(request)
        if self._free or self._express_free:  # else the end of a flush wakes the runner
            self._wake.set()
        return await future

    async def close(self) -> None:
        """Flush what is queued, wait for every flush in flight, stop."""
        self._closing = True
        self._wake.set()
        if self._runner is not None:
            await self._runner
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait = self._start_flushes()
            if self._closing and not self._light and not self._queue:
                return
            if wait is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    def _start_flushes(self) -> float | None:
        """Start every flush that is due and has a slot; return how long until the next one
        is due (None: none is, until something arrives or a flush ends).

        A flush is due when its oldest request has waited `delay` or `max_jobs` jobs wait:
        under load the slots are busy, requests pile up meanwhile, and flushes grow by
        themselves; when idle, a request waits at most `delay`."""
        now = time.monotonic()
        wait: float | None = None
        arrivals = self._arrivals
        while arrivals and arrivals[0].taken:
            arrivals.popleft()
        while self._light and self._express_free:
            # A light request is flushed at once: the express slot is for latency, and light
            # requests that arrive while it is busy share its next flush.
            self._express_free -= 1
            self._spawn(self._take_light(), express=True)
        while self._free and (self._queue or self._light):
            # Light requests use a general slot only when no other request waits for one.
            # Nothing being flushed: nothing to share a commit with by waiting, so go at once.
            # Under load, requests gather while flushes are in flight, and each flush takes
            # what gathered (waiting `delay` at most for more).
            idle = self._free == self._slots
            if self._queue:
                due = 0.0 if idle else self._due(self._oldest(), self._queue.jobs, now)
            else:
                due = 0.0 if idle else self._due(self._light_oldest(), self._light_jobs, now)
            if due > 0:
                wait = due if wait is None else min(wait, due)
                break
            self._free -= 1
            batch = self._queue.take(self._max_jobs) if self._queue else self._take_light()
            self._spawn(batch, express=False)
        return wait

    def _due(self, oldest: float, jobs: int, now: float) -> float:
        if self._closing or jobs >= self._max_jobs:
            return 0.0
        return max(0.0, oldest + self._delay - now)

    def _oldest(self) -> float:
        """When the oldest request not yet taken arrived (light ones included: a general
        flush is due no later than the light request that waited longest)."""
        arrivals = self._arrivals
        while arrivals[0].taken:
            arrivals.popleft()
        return arrivals[0].queued_at

    def _light_oldest(self) -> float:
        return next(iter(self._light.values())).queued_at

    def _take_light(self) -> list[_Request]:
        taken: list[_Request] = []
        jobs = 0
        for source, request in list(self._light.items()):
            if taken and jobs + request.jobs > self._max_jobs:
                break
            del self._light[source]
            request.taken = True
            taken.append(request)
            jobs += request.jobs
        self._light_jobs -= jobs
        return taken

    def _spawn(self, batch: list[_Request], *, express: bool) -> None:
        task = asyncio.create_task(self._flush(batch, express), name="group-commit-flush")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Request], express: bool) -> None:
        try:
            started = time.perf_counter()
            await self._flush_together(batch)
            self._on_flushed(sum(r.jobs for r in batch), time.perf_counter() - started)
        except Exception as exc:
            # Not Postgres's answer but a fault of ours: the requests fail now, rather than
            # wait for their deadlines with nothing left to answer them.
            log.exception("a group commit failed")
            _fail(batch, exc)
        finally:
            if express:
                self._express_free += 1
            else:
                self._free += 1
            for request in batch:
                left = self._outstanding[request.source] - 1
                if left:
                    self._outstanding[request.source] = left
                else:
                    del self._outstanding[request.source]
            self._wake.set()

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
