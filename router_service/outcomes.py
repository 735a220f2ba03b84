"""Recording what deliveries did, in batches: one transaction for many attempts and parkings.

Lanes hand over outcomes as deliveries finish; a flush writes up to `max_batch` of what has
gathered with jobsdb.queue.record_outcomes (one statement) and parks held jobs with
jobsdb.queue.hold (one statement), in that order and in one pipelined transaction, then tells
each lane which of its jobs are on record. Until then the lane keeps them out of its reads. If
Postgres is unreachable nothing is dropped: the flush is retried, and the lanes keep those jobs
held.

Flushes are capped so that a backlog becomes a stream of moderate transactions rather than a
few huge ones (each holding its rows, and every waiting lane, for seconds), and up to
`concurrency` of them are in flight at once, so the router prepares the next while Postgres
writes the last. Concurrent flushes touch disjoint jobs and lock delivery_counts rows in one
order, so they cannot deadlock. A flush that parks jobs runs alone: its parkings must be
committed before a later flush ends their blocker, whose release of waiters would otherwise
not see them (it reads a snapshot taken before they were parked).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from psycopg_pool import AsyncConnectionPool

from jobsdb import queue
from jobsdb.errors import JobsDBError
from jobsdb.pool import transaction
from jobsdb.queue import Outcome
from relayq.tasks import cancel_and_wait
from router_service import metrics
from router_service.model import Job

log = logging.getLogger(__name__)


class Lane(Protocol):
    """Whom the flusher tells what is on record (router_service.lane.Lane)."""

    def recorded(self, job_ids: list[int]) -> None:
        """These jobs' outcomes or parkings are committed."""

    def notify(self) -> None:
        """Runnable jobs may wait in Postgres: read again."""


@dataclass(slots=True)
class _Entry:
    """What one hand-over wrote: an attempt and the jobs parked with it travel together."""

    lane: Lane
    outcome: Outcome | None
    parks: Sequence[tuple[Job, int]]

    def __len__(self) -> int:
        return (self.outcome is not None) + len(self.parks)


@dataclass
class _Batch:
    outcomes: list[tuple[Lane, Outcome]] = field(default_factory=list)
    parks: list[tuple[Lane, Job, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.outcomes) + len(self.parks)

    def add(self, entry: _Entry) -> None:
        if entry.outcome is not None:
            self.outcomes.append((entry.lane, entry.outcome))
        for job, blocker in entry.parks:
            self.parks.append((entry.lane, job, blocker))


class OutcomeFlusher:
    def __init__(self, pool: AsyncConnectionPool, router_id: str, *, delay: float,
                 max_batch: int, concurrency: int = 2) -> None:
        self._pool = pool
        self._router_id = router_id  # fences writes to the partitions it holds leases on
        self._actor = f"router:{router_id}"
        self._delay = delay
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._entries: deque[_Entry] = deque()
        self._size = 0  # outcomes and parkings in _entries
        self._writes: set[asyncio.Task[None]] = set()
        self._exclusive = False  # the write in flight parks jobs: nothing else meanwhile
        self._holding = False  # a batch is taken and waits for its turn
        self._written = asyncio.Event()
        self._more = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outcome-flusher")

    def add(self, lane: Lane, outcome: Outcome, park: Sequence[tuple[Job, int]] = ()) -> None:
        self._append(_Entry(lane, outcome, tuple(park)))

    def park(self, lane: Lane, parks: Sequence[tuple[Job, int]]) -> None:
        if parks:
            self._append(_Entry(lane, None, tuple(parks)))

    async def drain(self) -> None:
        """Wait until everything handed over so far is on record."""
        while self._entries or not self._idle.is_set():
            self._more.set()
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.drain()
        if self._task is not None:
            await cancel_and_wait([self._task])

    def _append(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self._size += len(entry)
        self._idle.clear()
        self._more.set()

    def _take(self) -> _Batch:
        """The oldest entries, up to max_batch items (at least one entry)."""
        batch = _Batch()
        while self._entries and (not len(batch)
                                 or len(batch) + len(self._entries[0]) <= self._max_batch):
            entry = self._entries.popleft()
            self._size -= len(entry)
            batch.add(entry)
        return batch

    async def _run(self) -> None:
        while True:
            await self._more.wait()
            if self._size < self._max_batch and self._delay:
                await asyncio.sleep(self._delay)  # let more outcomes join this flush
            self._more.clear()
            while self._entries:
                while self._exclusive or len(self._writes) >= self._concurrency:
                    await self._wait_written()
                batch = self._take()
                self._holding = True
                if batch.parks:
                    while self._writes:
                        await self._wait_written()
                    self._exclusive = True
                task = asyncio.create_task(self._write(batch), name="outcome-write")
                self._writes.add(task)
                self._holding = False
                task.add_done_callback(self._written_one)
            if not self._writes:
                self._idle.set()

    async def _wait_written(self) -> None:
        self._written.clear()
        await self._written.wait()

    def _written_one(self, task: asyncio.Task[None]) -> None:
        self._writes.discard(task)
        self._exclusive = False
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("recording outcomes failed unexpectedly", exc_info=exc)
        self._written.set()
        if not self._writes and not self._entries and not self._holding:
            self._idle.set()
    async def _write(self, batch: _Batch) -> None:
        failures = 0
        started = time.perf_counter()
        while True:
            try:
                async with transaction(self._pool) as conn, conn.pipeline(), conn.transaction():
                    recorded = await queue.record_outcomes(
                        conn, [o for _, o in batch.outcomes], actor=self._actor,
                        owner=self._router_id)
                    parked = await queue.hold(
                        conn, [(job.job_id, blocker) for _, job, blocker in batch.parks],
                        owner=self._router_id)
                break
            except JobsDBError as exc:
                failures += 1
                pause = min(5.0, 0.1 * 2 ** failures)
                log.warning("recording %d outcomes failed (%s); retrying in %.1fs",
                            len(batch), exc, pause)
                await asyncio.sleep(pause)
        metrics.FLUSH_ITEMS.observe(len(batch))
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        done: dict[Lane, list[int]] = defaultdict(list)
        ended: set[Lane] = set()
        for lane, outcome in batch.outcomes:
            done[lane].append(outcome.job_id)
            if outcome.state in ("succeeded", "aborted"):
                ended.add(lane)
        for lane, job, _ in batch.parks:
            done[lane].append(job.job_id)
            if job.job_id not in parked:
                lane.notify()  # its blocker ended meanwhile: it is runnable, read it again
        for lane, job_ids in done.items():
            lane.recorded(job_ids)
        if recorded.released:
            for lane in ended:
                lane.notify()  # waiters were released: read them back
