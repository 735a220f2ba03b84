"""One destination's delivery loop: read runnable jobs, send them, hand their outcomes over.

The lane is the I/O around the ordering barrier (router_service.barrier, which decides what
may go and what an answer means). It reads its destination's runnable jobs in job order
through the router's reader, sends ready jobs through its sender when its concurrency, its
rate limit and the router's fair scheduler allow, and hands each outcome, with the jobs to
park behind a failure, to the outcome flusher; the flusher tells it when they are on record.

The lane never blocks another destination: its own concurrency, rate limit and slowness only
hold back its own jobs. Its collaborators are handed to it (LaneContext), so it knows nothing
of the engine that made it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from jobsdb.catalog import Destination
from jobsdb.errors import JobsDBError
from jobsdb.eventlog import LoggedEvent, Request, WantedFor
from jobsdb.queue import Outcome
from relayq.tasks import cancel_and_wait
from router_service import metrics
from router_service.barrier import Barrier
from router_service.circuit import Breaker, Change, CircuitPolicy
from router_service.fairness import FairScheduler
from router_service.logread import CursorWriter, LogReader
from router_service.membership import Membership
from router_service.model import Job
from router_service.outcomes import OutcomeFlusher
from router_service.ratelimit import RateLimiter
from router_service.reads import Reader
from router_service.retry import Result, RetryPolicy, Verdict
from router_service.routing import Routing, document
from router_service.senders import Sender
from router_service.tracks import Positions

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LaneSettings:
    # Jobs read per pickup, and held in memory per destination at most.
    batch: int
    max_held: int


@dataclass(frozen=True, slots=True)
class LaneContext:
    """What every lane of a router shares."""

    settings: LaneSettings
    reader: Reader
    flusher: OutcomeFlusher
    scheduler: FairScheduler
    membership: Membership
    # Is the router stopping? (Then nothing new is read or sent.)
    stopping: Callable[[], bool]
    # Called whenever a delivery finishes (the router's drain waits on it).
    settled: Callable[[], None]
    # Writes a circuit's opening (True, with the reason) or closing down for every router.
    circuit_changed: Callable[[Destination, bool, str], None]
    # The event log: where this router stands in it, the reads of lagging destinations, the
    # cursors' writer, the connections as now loaded, and who waits behind which row.
    positions: Positions
    log: LogReader
    cursors: CursorWriter
    routing: Callable[[], Routing]
    blocked: dict[tuple[int, str], int]


class Lane:
    def __init__(self, context: LaneContext, destination: Destination, sender: Sender) -> None:
        self.context = context
        self.destination = destination
        self.sender = sender
        self.rate = RateLimiter(destination.rate_per_second, destination.rate_burst)
        self.policy = _policy(destination)
        self.breaker = Breaker(_circuit_policy(destination),
                               is_open=destination.circuit_opened_at is not None)
        self.barrier = Barrier(on_forget=self._forgot)
        self.destination_key = destination.destination_key
        # May have runnable jobs in Postgres we have not read.
        self.dirty = True
        # When the earliest known retry of this destination comes due (wall clock).
        self.next_due: datetime | None = None
        self.last_pickup: datetime | None = None
        self.read_at = 0.0  # monotonic, when the last read began
        self.wake = asyncio.Event()
        self.wake.set()
        # Two wake-up timers: when the earliest known retry comes due, and when the next
        # delivery may go (the rate limit, the circuit's next probe). One shared timer let
        # the due one and the others cancel each other.
        self._due_timer: asyncio.TimerHandle | None = None
        self._dispatch_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        # Batches: when the wait for a fuller one ends (monotonic; None: not waiting).
        self._linger_until: float | None = None
        self._reading_own = False
        # Metrics observed per delivery and per job: their children looked up once.
        self._delivery_seconds = metrics.DELIVERY_SECONDS.labels(destination.type)
        self._end_to_end = metrics.END_TO_END_SECONDS
        self.task = asyncio.create_task(self._run(), name=f"lane-{destination.id}")

    # --- configuration -------------------------------------------------------------------

    def configure(self, destination: Destination, sender: Sender | None) -> None:
        resumed = self.destination.paused and not destination.paused
        if destination.paused and not self.destination.paused:
            # What it only queued is read again when it resumes (it lags meanwhile, so the
            # router's reading of the log goes on without it).
            self.barrier.drop_queued()
        if (destination.rate_per_second, destination.rate_burst) != (
                self.destination.rate_per_second, self.destination.rate_burst):
            self.rate.configure(destination.rate_per_second, destination.rate_burst)
        was_open = self.destination.circuit_opened_at is not None
        now_open = destination.circuit_opened_at is not None
        self.destination = destination
        self.policy = _policy(destination)
        self.breaker.policy = _circuit_policy(destination)
        if was_open != now_open:  # opened or closed elsewhere: another router, an operator
            self.breaker.set_open(now_open, time.monotonic())
            resumed = resumed or not now_open
        if sender is not None:
            old, self.sender = self.sender, sender
            self._spawn(old.close())
        if resumed:
            self.dirty = True
        self.wake.set()

    # --- signals from the engine and the flusher -----------------------------------------

    def notify(self) -> None:
        """New jobs may be runnable (NOTIFY, poll, released waiters)."""
        self.dirty = True
        self.wake.set()

    def admit_logged(self, jobs: list[tuple[Job, int | None]]) -> None:
        """Jobs read from the log for this destination, in job order, each with the job its
        user waits behind here (None: none)."""
        admitted = self.barrier.admit_logged(jobs)
        if admitted.parks:
            self.context.flusher.park(self, admitted.parks)
        self.wake.set()

    @property
    def room(self) -> int:
        """How many more jobs it may hold."""
        return self.context.settings.max_held - len(self.barrier.held)

    @property
    def takes_logged(self) -> bool:
        """Whether the shared read may hand it jobs now (a paused destination lags: it reads
        its share when it resumes)."""
        return (not self.destination.paused and not self.context.stopping()
                and self.destination_key not in self.context.routing().holding)

    def due_at(self, when: datetime) -> None:
        """A retry comes due then; read again at that time."""
        if self.next_due is None or when < self.next_due:
            self.next_due = when
            self._arm_due()

    def recorded(self, decided: list[Job], undecided: list[Job]) -> None:
        """These jobs' fate is committed (`decided`), or must still be delivered after all
        (`undecided`: read again): they leave memory, and frozen users may thaw."""
        positions = self.context.positions
        key = self.destination_key
        for job in decided:
            if job.logged:
                positions.decided(key, job.partition, job.event_id)
        for job in undecided:
            positions.forget(key, job.partition, job.event_id)
        if self.barrier.recorded([j.job_id for j in decided] + [j.job_id for j in undecided]):
            self.dirty = True
        self.context.cursors.changed()
        self.context.log.wake()  # what was decided may open a partition's window
        self.wake.set()

    def _forgot(self, job: Job) -> None:
        """A logged job left memory undecided: this destination reads that partition again
        from where everything of it is settled."""
        self.context.positions.forget(self.destination_key, job.partition, job.event_id)
        self.context.cursors.changed()

    def reconsider(self) -> None:
        """An operator put old jobs back in front of newer ones (a retried abort): let
        Postgres order again everything we only queued."""
        self.barrier.reconsider()
        self.notify()

    def drop_partitions(self, lost: set[int]) -> None:
        self.barrier.drop_partitions(lost)

    def abandon_in_flight(self) -> None:
        """The lease can no longer be proven: cancel every delivery in flight (their jobs go
        back to Postgres's keeping, unanswered) and forget what was only queued."""
        self.barrier.drop_queued()
        for task in self._deliveries:
            task.cancel()

    @property
    def held_by_partition(self) -> dict[int, int]:
        return self.barrier.held_by_partition

    @property
    def busy(self) -> bool:
        """Reading, or holding jobs it read: it will look for more by itself."""
        return self.barrier.reading or not self.barrier.empty or self._reading_own

    @property
    def in_flight(self) -> int:
        return self.barrier.in_flight

    @property
    def queued(self) -> int:
        return self.barrier.queued

    @property
    def idle(self) -> bool:
        return (self.barrier.empty and not self.dirty and self.next_due is None
                and not self._reading_own
                and not self.context.positions.lagging(self.destination_key))

    async def close(self) -> None:
        for timer in (self._due_timer, self._dispatch_timer):
            if timer is not None:
                timer.cancel()
        await cancel_and_wait([self.task, *self._tasks])
        await self.sender.close()

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        membership = self.context.membership
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.destination.paused or self.context.stopping():
                continue
            usable = membership.usable()
            if not usable:
                continue
            try:
                if self._should_read():
                    await self._read(usable)
                if self._should_read_own():
                    await self._read_own()
                await self._dispatch()
            except JobsDBError as exc:
                log.warning("lane read failed: %s", exc, extra={"destination": self.destination.id})
                await asyncio.sleep(1.0)
                self.wake.set()
            except Exception:
                # A bug must not silently stop a destination's deliveries for good: say so
                # loudly and go on (what it held stays held; Postgres still has everything).
                log.exception("lane loop failed", extra={"destination": self.destination.id})
                await asyncio.sleep(1.0)
                self.wake.set()

    def _should_read(self) -> bool:
        if self.next_due is not None:
            if self.next_due <= datetime.now(UTC):
                self.next_due = None
                self.dirty = True
            else:
                # Woken before it came due (asyncio fires timers up to its clock resolution
                # early; other wake-ups come first): keep a timer for it, or nothing would
                # wake us when it does (seen: a due retry stuck for good on a loaded machine).
                self._arm_due()
        settings = self.context.settings
        # Read only when what we hold runs low: the read excludes everything held, and a small
        # exclusion list keeps it cheap.
        return (self.dirty and len(self.barrier.held) <= settings.max_held - settings.batch
                and len(self.barrier.ready)
                < self.destination.concurrency * max(1, self.sender.max_batch))

    async def _read(self, usable: frozenset[int]) -> None:
        settings = self.context.settings
        barrier = self.barrier
        limit = min(settings.batch, settings.max_held - len(barrier.held))
        barrier.begin_read()
        self.read_at = time.monotonic()
        # Cleared before the read, not after: a notification that arrives while it runs may
        # be for jobs committed after its snapshot, and must make us read again.
        self.dirty = False
        try:
            read = await self.context.reader.pickup(
                self.destination.destination_key, limit, usable, barrier.held.keys())
        except BaseException:
            barrier.read_failed()
            self.dirty = True
            raise
        self.last_pickup = datetime.now(UTC)
        metrics.PICKUP_JOBS.observe(len(read.candidates))
        admitted = barrier.admit(read.candidates)
        if admitted.parks:
            self.context.flusher.park(self, admitted.parks)
        if admitted.stale or not read.complete:
            self.dirty = True
            self.wake.set()

    def _should_read_own(self) -> bool:
        settings = self.context.settings
        return (self.destination_key not in self.context.routing().holding
                and self.room >= min(settings.batch, settings.max_held // 4)
                and len(self.barrier.ready)
                < self.destination.concurrency * max(1, self.sender.max_batch)
                and bool(self.context.positions.lagging(self.destination_key)))

    async def _read_own(self) -> None:
        """Read this destination's share of the partitions where it lags, up to its room,
        and take in its jobs; a partition read through to where the shared read is makes it
        follow that read again."""
        context = self.context
        positions = context.positions
        key = self.destination_key
        usable = context.membership.usable()
        lagging = {p: after for p, after in positions.lagging(key).items() if p in usable}
        if not lagging:
            return
        sources = context.routing().sources_of.get(key, ())
        each = max(1, self.room // len(lagging))
        wanted = [WantedFor(key, p, after, positions.position[p], each, sources)
                  for p, after in sorted(lagging.items())]
        taken = {p: positions.taken(p) for p in lagging}
        self._reading_own = True
        try:
            events = await context.log.read_own(wanted) if sources else []
        finally:
            self._reading_own = False
        # The read may have found the connections changed (read_own loads them again): read
        # with the sources as they are now, or a new source's events would be passed over.
        routing = context.routing()
        if routing.sources_of.get(key, ()) != sources:
            self.wake.set()
            return
        # A partition rewound below where the read began (a job of it left memory undecided
        # meanwhile) is read again from there: what the read found in it would go ahead of
        # the user's jobs read again (seen: a user's later jobs delivered first, the earlier
        # ones then parked behind the later one's failure, read again and parked again, for
        # good). So is one dropped, or dropped and taken again, while the read ran: the new
        # taking starts from what Postgres has, which another router may have moved on. Those
        # events are left to the next read.
        now_lagging = positions.lagging(key)
        stale = {w.partition for w in wanted
                 if not positions.reading(w.partition)
                 or positions.taken(w.partition) != taken[w.partition]
                 or now_lagging.get(w.partition, w.after) < w.after}
        if stale:
            events = [e for e in events if e.partition not in stale]
        read: dict[int, list[LoggedEvent]] = {}
        for event in events:
            read.setdefault(event.partition, []).append(event)
        jobs = self._jobs_from(events, routing)
        for w in wanted:
            if w.partition in stale:
                continue
            found = read.get(w.partition, [])
            upto = found[-1].event_id if len(found) >= w.limit else w.upto
            positions.read_own(key, w.partition, w.after, upto)
        if jobs:
            self.admit_logged(jobs)
        context.cursors.changed()
        self.wake.set()

    def _jobs_from(self, events: list[LoggedEvent], routing: Routing
                   ) -> list[tuple[Job, int | None]]:
        """This destination's jobs among events it read itself (what a filter keeps out is
        settled at once; what it holds or has settled already is not taken twice)."""
        positions = self.context.positions
        blocked = self.context.blocked
        key = self.destination_key
        jobs: list[tuple[Job, int | None]] = []
        for event in events:
            route = routing.by_pair.get((event.source_key, key))
            partition = event.partition
            if (route is None or event.event_id <= route.after
                    or not positions.reading(partition)
                    or positions.is_held(key, partition, event.event_id)
                    or positions.is_settled(key, partition, event.event_id)):
                continue
            if route.filter is not None and route.filter.evaluate(
                    document(event.document)) is not True:
                self.context.cursors.filtered[event.source_key, key] += 1
                metrics.FILTERED.labels(self.destination.id).inc()
                continue
            positions.held(key, partition, event.event_id)
            jobs.append((Job.from_event(event, route.slot),
                         blocked.get((key, event.user_id))))
        return jobs

    async def _dispatch(self) -> None:
        """Send ready jobs while the destination's concurrency (requests in flight: a batch
        is one), its rate limit (jobs per second) and the router's fair scheduler allow.

        Nothing once the router is stopping, though a read that began before may have
        brought jobs in since: the stop waits only for the deliveries in flight when it
        looks, then cancels the rest, so a delivery started after that would reach the
        destination and go unrecorded, and the next owner of its partition would deliver it
        again. What is held and not sent stays as Postgres has it."""
        destination = self.destination
        barrier = self.barrier
        context = self.context
        scheduler = context.scheduler
        may_deliver = context.membership.may_deliver
        breaker = self.breaker
        sender = self.sender
        while (barrier.ready and len(self._deliveries) < destination.concurrency
               and not context.stopping()):
            if breaker.is_open:
                # Open circuit: one probe at a time, one per interval: the next job in order.
                if barrier.in_flight:
                    return
                wait = breaker.probe_wait(time.monotonic())
                if wait > 0:
                    self._wake_in(wait)
                    return
            elif self._lingering(sender.max_batch):
                return
            limit = 1 if breaker.is_open else sender.max_batch
            # The rate limit counts jobs, not requests: a batch of 100 takes 100 tokens.
            limit, wait = self.rate.take_up_to(limit)
            if not limit:
                self._wake_in(wait)
                return
            await scheduler.acquire(destination.tenant_key, destination.destination_key)
            if context.stopping():  # began while we waited for the permit
                self.rate.give_back(limit)
                scheduler.release(destination.tenant_key)
                return
            # Checked per job as it goes: the partition may have moved while we waited.
            batch = barrier.take(limit, may_deliver, per_user=sender.per_user,
                                 max_bytes=sender.max_bytes)
            self.rate.give_back(limit - len(batch))
            if not batch:
                scheduler.release(destination.tenant_key)
                continue
            self._linger_until = None
            if breaker.is_open:
                breaker.probed(time.monotonic())
                log.info("probing an open circuit", extra={
                    "destination": destination.id, "job_id": batch[0].job_id})
            metrics.IN_FLIGHT.inc(len(batch))
            self._deliveries.add(self._spawn(self._deliver(batch)))

    def _lingering(self, max_batch: int) -> bool:
        """Wait (up to the destination's linger) for a fuller batch? Not when a full one is
        ready, nor once the first job ready for this batch has waited the linger out."""
        linger = self.destination.batch_linger_ms / 1000
        if not linger or max_batch <= 1 or self.barrier.queued >= max_batch:
            return False
        now = time.monotonic()
        if self._linger_until is None:
            self._linger_until = now + linger
        if now >= self._linger_until:
            return False
        self._wake_in(self._linger_until - now)
        return True

    async def _deliver(self, jobs: list[Job]) -> None:
        started = datetime.now(UTC)
        clock = time.perf_counter()
        try:
            results = await self.sender.deliver(jobs)
        except asyncio.CancelledError:
            # Given up on: nothing is known of these attempts, and nothing is recorded. The
            # jobs stay as Postgres has them, for whoever owns their partition next.
            self.barrier.abandon(jobs)
            metrics.ABANDONED.inc(len(jobs))
            raise
        except Exception as exc:  # a sender bug must not lose the jobs: they are retried
            log.exception("delivery failed unexpectedly",
                          extra={"destination": self.destination.id})
            results = [Result(Verdict.RETRY, "internal", repr(exc))] * len(jobs)
        finally:
            self.context.scheduler.release(self.destination.tenant_key)
            self.barrier.returned(len(jobs))
            metrics.IN_FLIGHT.dec(len(jobs))
        seconds = time.perf_counter() - clock
        self._delivery_seconds.observe(seconds)
        self._settle(jobs, results, started, seconds)
        self.wake.set()
        self.context.settled()

    def _settle(self, jobs: list[Job], results: Sequence[Result], started: datetime,
                seconds: float) -> None:
        """Every job's answer of one delivery: outcomes handed to the flusher (the successes
        as one hand-over), users moved along, failures scheduled, the circuit told."""
        now = datetime.now(UTC)
        mono = time.monotonic()
        destination = self.destination
        duration_ms = int(seconds * 1000)
        succeeded: list[tuple[Job, Outcome]] = []
        answered = ""
        counts: Counter[Verdict] = Counter()
        # Every job answered OK (the usual case): the breaker, the counts and the barrier
        # hear it once, as they would have job by job.
        if results and all(result.verdict is Verdict.OK for result in results):
            if (change := self.breaker.record(results[0], mono)) is not None:
                self._circuit(change)
            succeeded = self.barrier.settle_ok(jobs, results, started=started,
                                               duration_ms=duration_ms)
            metrics.observe_many(self._end_to_end,
                                 [(now - job.created_at).total_seconds() for job in jobs])
            answered = next((result.status for result in results if result.status), "")
            self._hand_over(succeeded, answered, started, duration_ms)
            metrics.ATTEMPTS.labels(destination.id, Verdict.OK.value).inc(len(results))
            return
        for job, result in zip(jobs, results, strict=True):
            counts[result.verdict] += 1
            if result.error_code == "429":
                self.rate.too_many_requests(result.retry_after)
            change = self.breaker.record(result, mono)
            if change is not None:
                self._circuit(change)
            # An open circuit says the destination is down: its jobs wait, none is given up.
            settled = self.barrier.settle(job, result, started=started, now=now,
                                          duration_ms=duration_ms, policy=self.policy,
                                          may_give_up=not self.breaker.is_open)
            outcome = settled.outcome
            if outcome.state == "succeeded":
                succeeded.append((job, outcome))
                answered = answered or result.status
                self._end_to_end.observe((now - job.created_at).total_seconds())
                continue
            # The failed job and everything queued behind it are written together; the user
            # stays frozen until they are.
            self.context.flusher.add(self, job, outcome, park=settled.parks)
            if outcome.state == "failed":
                assert outcome.retry_at is not None
                assert settled.retry_in is not None
                self.due_at(outcome.retry_at)
                log.info("delivery failed; will retry", extra={
                    "tenant": destination.tenant_id, "destination": destination.id,
                    "job_id": job.job_id, "attempt": job.attempt,
                    "error_code": result.error_code, "retry_in_s": round(settled.retry_in, 1)})
            else:
                log.warning("job aborted", extra={
                    "tenant": destination.tenant_id, "destination": destination.id,
                    "job_id": job.job_id, "attempt": job.attempt, "reason": outcome.reason})
        self._hand_over(succeeded, answered, started, duration_ms)
        for verdict, count in counts.items():
            metrics.ATTEMPTS.labels(destination.id, verdict.value).inc(count)

    def _hand_over(self, succeeded: list[tuple[Job, Outcome]], answered: str,
                   started: datetime, duration_ms: int) -> None:
        """The successes of one delivery, to the flusher as one request."""
        if succeeded:
            batch = succeeded[0][1].batch or ""
            request = (Request(started, duration_ms, answered, batch) if answered else None)
            self.context.flusher.add_many(self, succeeded, request)

    def _arm_due(self) -> None:
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if self.next_due is not None:
            delay = max(0.0, (self.next_due - datetime.now(UTC)).total_seconds())
            self._due_timer = asyncio.get_running_loop().call_later(delay, self.wake.set)

    def _circuit(self, change: Change) -> None:
        destination = self.destination
        opened = change is Change.OPENED
        reason = self.breaker.reason if opened else "a probe succeeded"
        metrics.CIRCUIT_CHANGES.labels(change.value).inc()
        log.warning("circuit %s", change.value, extra={
            "tenant": destination.tenant_id, "destination": destination.id, "reason": reason})
        self.context.circuit_changed(destination, opened, reason)
        if not opened:
            self.wake.set()

    def _wake_in(self, delay: float) -> None:
        if self._dispatch_timer is not None:
            self._dispatch_timer.cancel()
        self._dispatch_timer = asyncio.get_running_loop().call_later(delay, self.wake.set)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._deliveries.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("lane task failed", exc_info=exc,
                      extra={"destination": self.destination.id})


def _circuit_policy(destination: Destination) -> CircuitPolicy:
    return CircuitPolicy(open_after=destination.circuit_after_s,
                         min_failures=destination.circuit_min_failures,
                         probe_every=destination.circuit_probe_s)


def _policy(destination: Destination) -> RetryPolicy:
    return RetryPolicy(
        min_backoff=destination.min_backoff_ms / 1000,
        max_backoff=destination.max_backoff_ms / 1000,
        max_attempts=destination.max_attempts,
        max_retry_window=timedelta(seconds=destination.max_retry_window_s),
    )
