"""Recording what deliveries did, in batches: one transaction for many attempts and parkings.

Lanes hand over outcomes as deliveries finish; a flush writes up to `max_batch` of what has
gathered in one pipelined transaction, then tells each lane which of its jobs are on record.
Jobs with rows (retries, released waiters: the row path) are recorded as before: their rows
moved with jobsdb.queue.record_outcomes and held ones parked with jobsdb.queue.hold. Jobs read
from the event log cost no row when they succeed: one deliveries row per destination says
what was delivered (jobsdb.eventlog.record_deliveries), and the cursors move later
(router_service.logread); a first attempt that failed or was aborted gets its row
(insert_rows), and a job whose user is held behind a row is parked as a new waiting row
(park). The flush also asks which users are held now (jobsdb.queue.roots), for the router's
picture of who must wait. Until a lane hears back it keeps those jobs out of its reads. If
Postgres is unreachable nothing is dropped: the flush is retried, and the lanes keep those jobs
held. A flush Postgres refuses for its content is split until the one outcome that causes it is
found and written with a safe text (`_commit`), so one poisoned answer cannot stop recording.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from jobsdb import eventlog, queue
from jobsdb.errors import DatabaseUnavailable, QueryCanceled
from jobsdb.eventlog import Delivered, NewRow, Parked, Request
from jobsdb.pool import transaction
from jobsdb.queue import Outcome
from relayq.tasks import cancel_and_wait
from router_service import metrics
from router_service.model import Job

log = logging.getLogger(__name__)


class Lane(Protocol):
    """Whom the flusher tells what is on record (router_service.lane.Lane)."""

    destination_key: int

    def recorded(self, decided: list[Job], undecided: list[Job]) -> None:
        """These jobs' outcomes or parkings are committed (`decided`), or the write found
        they must be delivered after all (`undecided`: a logged job whose user was no
        longer held when its parking was written)."""

    def notify(self) -> None:
        """Runnable jobs may wait in Postgres: read again."""


Roots = dict[tuple[int, str], int | None]


@dataclass(slots=True)
class _Entry:
    """What one hand-over wrote: an attempt and the jobs parked with it travel together
    (one outcome with its parks), or many successes of one delivery together (no parks,
    and the request that carried them)."""

    lane: Lane
    outcomes: Sequence[tuple[Job, Outcome]]
    parks: Sequence[tuple[Job, int]]
    request: Request | None = None

    def __len__(self) -> int:
        return len(self.outcomes) + len(self.parks)


@dataclass
class _Batch:
    entries: list[_Entry] = field(default_factory=list)
    size: int = 0

    def __len__(self) -> int:
        return self.size

    def add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self.size += len(entry)


class _Written(NamedTuple):
    """What one committed write did."""

    released: int
    # Jobs parked (held row jobs and logged ones).
    parked: set[int]
    # Entries Postgres refused even with safe texts: their jobs stay held (see _commit).
    refused: frozenset[int] = frozenset()
    # Users' roots after the write (None: no longer held).
    roots: Roots = {}
    # Partitions of logged jobs it was to record that this router no longer owned when it
    # wrote (another router took them): every statement is fenced, so nothing of them was
    # recorded.
    fenced: frozenset[int] = frozenset()


class OutcomeFlusher:
    def __init__(self, pool: AsyncConnectionPool, router_id: str, *, delay: float,
                 max_batch: int, concurrency: int = 2,
                 on_roots: Callable[[Roots], None] = lambda roots: None,
                 kind_of: Callable[[int], str] = lambda destination_key: "") -> None:
        self._pool = pool
        # Told who is held behind which job after each write.
        self._on_roots = on_roots
        # A destination's type, for the answer a success records when the sender names none.
        self._kind_of = kind_of
        # Event ids per partition of the log (jobsdb.partitions.Settings; the engine sets it).
        self.partition_size = 1_000_000
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

    def add(self, lane: Lane, job: Job, outcome: Outcome,
            park: Sequence[tuple[Job, int]] = ()) -> None:
        self._append(_Entry(lane, ((job, outcome),), tuple(park)))

    def add_many(self, lane: Lane, outcomes: Sequence[tuple[Job, Outcome]],
                 request: Request | None = None) -> None:
        """Outcomes that park nothing (successes of one delivery, carried by `request`), as
        few hand-overs as a flush's cap allows."""
        for start in range(0, len(outcomes), self._max_batch):
            self._append(_Entry(lane, outcomes[start:start + self._max_batch], (), request))

    def park(self, lane: Lane, parks: Sequence[tuple[Job, int]]) -> None:
        if parks:
            self._append(_Entry(lane, (), tuple(parks)))

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
                if any(entry.parks for entry in batch.entries):
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
        started = time.perf_counter()
        written = await self._commit(batch.entries)
        metrics.FLUSH_ITEMS.observe(len(batch))
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - started)
        decided: dict[Lane, list[Job]] = defaultdict(list)
        undecided: dict[Lane, list[Job]] = defaultdict(list)
        ended: set[Lane] = set()
        for entry in batch.entries:
            if id(entry) in written.refused:
                continue
            lane = entry.lane
            for job, outcome in entry.outcomes:
                if job.logged and job.partition in written.fenced:
                    # Not on record: it is read again (by whoever holds the partition now,
                    # or by this router once it has taken the partition back from Postgres).
                    undecided[lane].append(job)
                    continue
                decided[lane].append(job)
                if outcome.state in ("succeeded", "aborted"):
                    ended.add(lane)
            for job, _ in entry.parks:
                if job.job_id in written.parked:
                    decided[lane].append(job)
                elif job.logged:
                    undecided[lane].append(job)  # its user is no longer held: deliver it
                else:
                    decided[lane].append(job)
                    lane.notify()  # its blocker ended meanwhile: it is runnable, read it again
        if written.roots:
            self._on_roots(written.roots)
        for lane in decided.keys() | undecided.keys():
            lane.recorded(decided.get(lane, []), undecided.get(lane, []))
        if written.released:
            for lane in ended:
                lane.notify()  # waiters were released: read them back

    async def _commit(self, entries: list[_Entry]) -> _Written:
        """Write the entries in one transaction, retrying while Postgres is unreachable.

        A write Postgres refuses for what it holds would fail the same way forever and stop
        every lane's recording behind it: then the entries are split and written in halves,
        so the others go on and the one that causes it is found; that one is written again
        with safe texts in place of the destination's answer (`_sanitised`), and if even that
        is refused, left unrecorded: its jobs keep their state in Postgres and are delivered
        again (at least once, never lost)."""
        failures = 0
        writes = _Writes(entries, self._kind_of, self.partition_size)
        while True:
            try:
                async with transaction(self._pool) as conn, conn.pipeline(), conn.transaction():
                    return await writes.run(conn, self._router_id, self._actor)
            except _TRANSIENT as exc:
                failures += 1
                pause = min(5.0, 0.1 * 2 ** failures)
                log.warning("recording %d outcomes failed (%s); retrying in %.1fs",
                            sum(map(len, entries)), exc, pause)
                await asyncio.sleep(pause)
            except Exception as exc:  # refused for what it holds (a bug, bad text, ...)
                return await self._isolate(entries, exc)

    async def _isolate(self, entries: list[_Entry], exc: Exception) -> _Written:
        if len(entries) == 1 and len(entries[0].outcomes) > 1:
            # Many successes of one delivery: each on its own, to find the one refused.
            (entry,) = entries
            entries = [_Entry(entry.lane, (pair,), (), entry.request) for pair in entry.outcomes]
        if len(entries) > 1:
            half = len(entries) // 2
            first = await self._commit(entries[:half])  # in order: parks follow their blockers
            second = await self._commit(entries[half:])
            return _Written(first.released + second.released, first.parked | second.parked,
                            first.refused | second.refused, {**first.roots, **second.roots},
                            first.fenced | second.fenced)
        (entry,) = entries
        safe = _sanitised(entry, exc)
        job_ids = [o.job_id for _, o in entry.outcomes] + [job.job_id for job, _ in entry.parks]
        if safe is not None:
            log.error("an outcome was refused (%s); recording it with a safe error text",
                      _describe(exc), extra={"job_id": job_ids[0]})
            metrics.UNRECORDABLE.labels("sanitised").inc()
            written = await self._commit([safe])
            return written._replace(refused=frozenset({id(entry)}) if written.refused
                                    else frozenset())
        log.error("recording was refused (%s); these jobs stay as they are in Postgres and"
                  " held by this router until it restarts", _describe(exc),
                  extra={"job_ids": job_ids})
        metrics.UNRECORDABLE.labels("refused").inc()
        return _Written(0, set(), frozenset({id(entry)}))


# Errors worth retrying as they are: Postgres unreachable, a lock conflict, a timeout.
_TRANSIENT = (DatabaseUnavailable, QueryCanceled)
_SAFE_PREFIX = "[not storable: "


def _sanitised(entry: _Entry, exc: Exception) -> _Entry | None:
    """The entry with the destination's words replaced by a note Postgres will take; None if
    there is nothing left to replace (it was sanitised already, or holds only parkings)."""
    if len(entry.outcomes) != 1:
        return None
    ((job, outcome),) = entry.outcomes
    if (outcome.response or "").startswith(_SAFE_PREFIX):
        return None
    # Only the error's type: its message may quote the very text that was refused.
    note = f"{_SAFE_PREFIX}{type(exc).__name__}]"
    return _Entry(entry.lane, ((job, outcome._replace(
        error_code=_ascii(outcome.error_code), response=note, reason=_ascii(outcome.reason))),),
        entry.parks, entry.request)


def _ascii(text: str | None) -> str | None:
    if text is None:
        return None
    return "".join(c if " " <= c <= "~" else "?" for c in text[:200])


def _describe(exc: Exception) -> str:
    return _ascii(f"{type(exc).__name__}: {exc}") or ""


# What a success records as the destination's answer when its sender names none.
_ANSWERED = {"grpc": "ok", "nats": "ack"}


class _Writes:
    """The statements of one flush, made once from its entries (a retry after a lost
    connection sends the same)."""

    def __init__(self, entries: Sequence[_Entry], kind_of: Callable[[int], str],
                 partition_size: int) -> None:
        self.row_outcomes: list[Outcome] = []
        self.row_parks: list[tuple[int, int]] = []
        self.new_rows: list[NewRow] = []
        self.parked: list[Parked] = []
        # One deliveries row per destination and event partition: a row lives in the
        # partition of its first event and goes with it when the log's partition is dropped.
        self.delivered: dict[tuple[int, int], Delivered] = {}
        self.counts: dict[int, list[int]] = {}
        # (destination, user) pairs whose rows this flush may change.
        self.pairs: set[tuple[int, str]] = set()
        # The partitions of the logged jobs it records (fenced by their leases).
        self.logged_partitions: set[int] = set()
        for entry in entries:
            destination = entry.lane.destination_key
            # The entry's request, as numbered in each deliveries row it is written to.
            request_index: dict[int, int] = {}
            for job, outcome in entry.outcomes:
                if job.logged:
                    self.logged_partitions.add(job.partition)
                if not job.logged:
                    # A row moved: its user may be held by another job now, or free.
                    self.row_outcomes.append(outcome)
                    self.pairs.add((destination, job.user_id))
                    continue
                if outcome.state == "succeeded":
                    number = job.event_id // partition_size
                    delivered = self.delivered.get((destination, number))
                    if delivered is None:
                        delivered = self.delivered[destination, number] = Delivered(destination)
                    index = request_index.get(number)
                    if index is None:
                        delivered.request_list.append(entry.request or Request(
                            outcome.started_at, outcome.duration_ms,
                            _ANSWERED.get(kind_of(destination), "ok"), outcome.batch or ""))
                        index = request_index[number] = len(delivered.request_list)
                    delivered.event_ids.append(job.event_id)
                    delivered.partitions.append(job.partition)
                    delivered.requests.append(index)
                    continue
                self.pairs.add((destination, job.user_id))
                self.new_rows.append(NewRow(
                    job.job_id, destination, job.tenant_key, job.source_key, job.partition,
                    outcome.state, outcome.retry_at, outcome.started_at, outcome.duration_ms,
                    job.created_at, job.user_id, job.message_id, outcome.error_code,
                    outcome.response, outcome.reason, outcome.batch))
                counts = self.counts.setdefault(destination, [0, 0])
                counts[0 if outcome.state == "failed" else 1] += 1
            for job, blocker in entry.parks:
                self.pairs.add((destination, job.user_id))
                if job.logged:
                    self.parked.append(Parked(
                        job.job_id, destination, job.tenant_key, job.source_key,
                        job.partition, job.created_at, job.user_id, job.message_id))
                else:
                    self.row_parks.append((job.job_id, blocker))

    async def run(self, conn: AsyncConnection[Any], owner: str, actor: str) -> _Written:
        # The partitions still owned (leases run out or not), share-locked until commit: no
        # other router can take them before this commits, and every statement below is
        # fenced by the same owner, so what this says is what they keep.
        leased = await eventlog.leased(conn, owner=owner)
        fenced = frozenset(self.logged_partitions - leased)
        recorded = await queue.record_outcomes(conn, self.row_outcomes, actor=actor,
                                               owner=owner)
        parked = await queue.hold(conn, self.row_parks, owner=owner)
        await eventlog.insert_rows(conn, self.new_rows, owner=owner, actor=actor)
        parked |= await eventlog.park(conn, self.parked, owner=owner)
        await eventlog.record_deliveries(conn, self.delivered.values(), owner=owner,
                                         actor=actor)
        await eventlog.count_outcomes(
            conn, {d: (c[0], c[1]) for d, c in self.counts.items()})
        roots: Roots = dict.fromkeys(self.pairs)
        if self.pairs:
            roots.update(await queue.roots(conn, self.pairs))
        return _Written(recorded.released, parked, roots=roots, fenced=fenced)
