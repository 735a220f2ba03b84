"""Reading the event log: once per partition for every destination, and on their own for the
destinations that fell behind; and writing where reading stands (the cursors).

The shared read (`LogReader.run`) reads every partition this router leases in event id order,
below the log's horizon (jobsdb.eventlog), and hands the events to the engine's fan-out, which
gives each destination following that partition its jobs. It reads a partition only as far
ahead of what is decided there as its window allows, so memory stays bounded and a
destination that delivers slowly cannot make the router read the whole log into memory. When
one destination holds a partition's window full for a while (the others have finished), or
at once when its lane is full too, that destination is made to lag (`on_stalled`): it goes
on from where it is, reading on its own, and the shared read moves on for everyone else.

Destinations that lag read through `read_own`, grouped as the row path's pickups are
(router_service.reads): the reads waiting at one moment go in one statement.

`CursorWriter` writes the frontier of each partition and the lagging destinations' cursors,
a small transaction now and then, made from what is committed only (router_service.tracks
plans it), one at a time, so what it writes is never ahead of what Postgres has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

from psycopg_pool import AsyncConnectionPool

from jobsdb import eventlog
from jobsdb.errors import JobsDBError
from jobsdb.eventlog import LoggedEvent, Wanted, WantedFor
from jobsdb.pool import transaction
from relayq.tasks import cancel_and_wait
from router_service import metrics
from router_service.tracks import Positions

log = logging.getLogger(__name__)

# A partition whose window stays full this long, its candidate not moving, has its holders
# made to lag.
STALL_SECONDS = 1.0


def event_size(event: LoggedEvent) -> int:
    """About what an event read costs in memory: its document and its other fields (the jobs
    made of it for each destination come on top)."""
    return len(event.document) + 256


@dataclass
class _Stall:
    since: float
    candidate: int
    # When its holders' lanes were last looked at (finding the holders walks the partition's
    # destinations: thousands, with thousands of destinations).
    looked: float = float("-inf")


class LogReader:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        positions: Positions,
        *,
        batch: int,
        window: int,
        window_bytes: int,
        poll_seconds: float,
        usable: Callable[[], Collection[int]],
        fan_out: Callable[[list[LoggedEvent]], None],
        on_stalled: Callable[[int, list[int]], bool],
        full: Callable[[list[int]], bool],
        ensure_config: Callable[[int], Awaitable[None]],
    ) -> None:
        self._pool = pool
        self._positions = positions
        self._batch = batch
        # Ids read ahead of what is decided, per partition, at most; and the bytes of the
        # events read ahead, over all partitions.
        self._window = window
        self._window_bytes = window_bytes
        self._poll_seconds = poll_seconds
        self._usable = usable
        self._fan_out = fan_out
        self._on_stalled = on_stalled
        self._full = full
        # Loads the connections again when a read saw a newer version of them.
        self.ensure_config = ensure_config
        self._wake = asyncio.Event()
        self._stalls: dict[int, _Stall] = {}
        self._own: list[_OwnRead] = []
        self._own_arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The log's horizon at the last read, and how many reads there have been.
        self.horizon = 0
        self.reads = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self.run(), name="log-read"),
                       asyncio.create_task(self._own_reads(), name="log-own-reads")]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        for request in self._own:
            request.future.cancel()
        self._own.clear()

    def wake(self, _payload: str = "") -> None:
        """New events may be in the log (NOTIFY relayq_events), or room in a window."""
        self._wake.set()

    # --- the shared read -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._idle_wait())
            self._wake.clear()
            try:
                while await self._read_once():
                    pass
            except JobsDBError as exc:
                log.warning("reading the event log failed: %s", exc)
                await asyncio.sleep(1.0)
                self._wake.set()
            except Exception:
                log.exception("reading the event log failed")
                await asyncio.sleep(1.0)
                self._wake.set()

    def _idle_wait(self) -> float:
        # While a window is full, look again soon: a stall is decided by time.
        return STALL_SECONDS / 4 if self._stalls else self._poll_seconds

    async def _read_once(self) -> bool:
        """One read of every partition that has room; True when one came back full (more
        to read at once)."""
        positions = self._positions
        wanted: list[Wanted] = []
        # Which taking of each partition this read is for: one dropped and taken again
        # while the read ran starts over from its frontier, and this read is not its.
        taken: dict[int, int] = {}
        now = time.monotonic()
        usable = sorted(self._usable())
        # Each partition's share of the bytes: one with many large events cannot starve the
        # others of their reads.
        share = self._window_bytes // max(1, len(usable))
        for partition in usable:
            if not positions.reading(partition):
                continue
            taken[partition] = positions.taken(partition)
            # The window is counted in ids above the candidate (ids are shared by every
            # partition, so it holds a few events of each at a time), and bounded in bytes.
            # Counted in events instead (ae1367e), it let a destination with sparse traffic
            # collect several jobs per request, but a flooding tenant's events filled it and
            # another tenant's waited seconds behind them: docs/benchmarks.md.
            candidate = positions.candidate(partition)
            _, size = positions.ahead(partition)
            room = (self._window - (positions.position[partition] - candidate)
                    if size < share else 0)
            if room <= 0:
                self._stalled(partition, candidate, now)
                continue
            self._stalls.pop(partition, None)
            wanted.append(Wanted(partition, positions.position[partition],
                                 min(self._batch, room)))
        if not wanted:
            return False
        async with transaction(self._pool) as conn, conn.pipeline():
            read = await eventlog.read(conn, wanted)
        self.horizon = read.horizon
        self.reads += 1
        metrics.LOG_READ_EVENTS.observe(len(read.events))
        if read.events:
            await self.ensure_config(read.config_version)
        # From here on nothing awaits: the positions move and the events are handed out
        # together, so a cursor write never sees events read but not yet held as decided.
        current = {w.partition for w in wanted
                   if positions.reading(w.partition)
                   and positions.taken(w.partition) == taken[w.partition]}
        found: dict[int, list[tuple[int, int]]] = {}
        for event in read.events:
            found.setdefault(event.partition, []).append((event.event_id, event_size(event)))
        full = False
        for w in wanted:
            if w.partition not in current:
                continue  # lost (or lost and taken again) while reading
            events = found.get(w.partition, [])
            if len(events) >= w.limit:
                positions.read_shared(w.partition, events[-1][0], events)
                full = True
            else:
                positions.read_shared(w.partition, read.horizon - 1, events)
        handed = [e for e in read.events if e.partition in current]
        if handed:
            self._fan_out(handed)
        return full

    def _stalled(self, partition: int, candidate: int, now: float) -> None:
        stall = self._stalls.get(partition)
        if stall is None or stall.candidate != candidate:
            self._stalls[partition] = stall = _Stall(now, candidate)
        lasted = now - stall.since >= STALL_SECONDS
        if not lasted and now - stall.looked < STALL_SECONDS / 4:
            return
        stall.looked = now
        holders = self._positions.holders(partition)
        if not holders:
            return
        if lasted or self._full(holders):
            if self._on_stalled(partition, holders):
                self._stalls.pop(partition, None)
                self._wake.set()
            else:  # nobody would gain: look again in a while
                stall.since = now

    # --- reads of the destinations that lag --------------------------------------------------

    async def read_own(self, wanted: Sequence[WantedFor]) -> list[LoggedEvent]:
        """One destination's events in the partitions it reads on its own (grouped with the
        other lagging destinations' reads waiting at the same moment), once the router's
        connections are at least as new as the read's."""
        request = _OwnRead(list(wanted))
        self._own.append(request)
        self._own_arrived.set()
        events, version = await request.future
        if events:
            await self.ensure_config(version)
        return events

    async def _own_reads(self) -> None:
        while True:
            while not self._own:
                self._own_arrived.clear()
                await self._own_arrived.wait()
            batch, self._own = self._own, []
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                continue
            try:
                async with transaction(self._pool) as conn:
                    found, version = await eventlog.read_for(
                        conn, [w for r in batch for w in r.wanted])
            except asyncio.CancelledError:
                for request in batch:
                    request.future.cancel()
                raise
            except Exception as exc:  # each lane decides what a failed read means to it
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for request in batch:
                if not request.future.done():
                    key = request.wanted[0].destination_key
                    request.future.set_result((found.get(key, []), version))


@dataclass
class _OwnRead:
    wanted: list[WantedFor]
    future: asyncio.Future[tuple[list[LoggedEvent], int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class CursorWriter:
    """Writes where reading stands, from what is committed, one transaction at a time."""

    def __init__(self, pool: AsyncConnectionPool, positions: Positions, router_id: str, *,
                 interval: float = 0.2) -> None:
        self._pool = pool
        self._positions = positions
        self._router_id = router_id
        self._interval = interval
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Events filters kept out, per (source, destination), to count for GetStats.
        self.filtered: Counter[tuple[int, int]] = Counter()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cursor-writer")

    def changed(self) -> None:
        self._dirty.set()

    async def close(self) -> None:
        """Write once more (a clean stop leaves the cursors where reading is), then stop."""
        if self._task is not None:
            await cancel_and_wait([self._task])
        with contextlib.suppress(JobsDBError):
            await self.write()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.write()
            except JobsDBError as exc:
                log.warning("writing the log cursors failed: %s", exc)
                self._dirty.set()
            await asyncio.sleep(self._interval)

    async def write(self) -> None:
        positions = self._positions
        plan = positions.plan()
        filtered, self.filtered = self.filtered, Counter()
        if not plan.frontiers and not plan.cursors and not filtered:
            return
        try:
            async with transaction(self._pool) as conn:
                leased = await eventlog.leased(conn, owner=self._router_id)
                await eventlog.move_frontiers(
                    conn, {p: f for p, f in plan.frontiers.items() if p in leased},
                    owner=self._router_id)
                await eventlog.move_cursors(
                    conn, {k: c for k, c in plan.cursors.items() if k[1] in leased},
                    owner=self._router_id)
                await eventlog.count_filtered(conn, dict(filtered))
        except BaseException:
            self.filtered.update(filtered)
            raise
        positions.written(plan, leased)
        metrics.CURSOR_WRITES.inc()
        metrics.LOG_LAGGING.set(positions.lagging_count())
