"""One destination's delivery: what the router holds of it in memory, and the loop that feeds it.

A lane reads runnable jobs of its destination in job order (router_service.reads), keeps one
queue per user, and keeps only each queue's head in flight, so a user's jobs reach the
destination one after another, in order. Success or abort lets the user's next job go.

Postgres has the last word on order. A job read with a holder (`held_by`) is parked there, and
a retryable failure parks the user's queued jobs behind the failed one. While such a write is
on its way the user is *frozen*: nothing of theirs is sent, because Postgres and memory may
disagree about what comes next until it commits. When it has, whatever of theirs the lane only
queued meanwhile is dropped from memory and read again, in job order, with Postgres's verdict.
Everything read stays `held` (excluded from the next read) until its fate is committed, so
nothing is read twice.

The lane never blocks another destination: its own concurrency, rate limit and slowness only
hold back its own jobs, and it asks the router's fair scheduler for every delivery.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from jobsdb.catalog import Destination
from jobsdb.errors import JobsDBError
from jobsdb.queue import Outcome
from relayq.tasks import cancel_and_wait
from router_service import metrics
from router_service.model import Job, Phase
from router_service.ratelimit import RateLimiter
from router_service.retry import Result, RetryPolicy, Verdict, backoff_delay, gives_up

if TYPE_CHECKING:
    from router_service.engine import Engine

log = logging.getLogger(__name__)


class Sender(Protocol):
    max_batch: int

    async def deliver(self, jobs: list[Job]) -> list[Result]: ...

    async def close(self) -> None: ...


class Lane:
    def __init__(self, engine: Engine, destination: Destination, sender: Sender) -> None:
        self.engine = engine
        self.destination = destination
        self.sender = sender
        self.rate = RateLimiter(destination.rate_per_second, destination.rate_burst)
        self.policy = _policy(destination)
        # Read and not yet recorded: excluded from the next read.
        self.held: dict[int, Job] = {}
        self.held_by_partition: Counter[int] = Counter()
        # Per user: the jobs the lane holds of them (except ended ones), in job order.
        self.keys: dict[str, list[Job]] = {}
        # Users with a park or failure being written: nothing of theirs goes out meanwhile.
        self.frozen: Counter[str] = Counter()
        # Users thawed while a read was running. That read's snapshot predates the commit that
        # thawed them, so what it says about them is stale: their candidates are read again.
        self._reading = False
        self._thawed_while_reading: set[str] = set()
        # An operator reordered jobs while a read was running: that read is stale entirely.
        self._reconsidered_while_reading = False
        # Users' heads that may go now, smallest job id first: the destination gets its jobs
        # in job order as far as per-user order and concurrency allow (what PeekJobs shows).
        # (A forgotten job's stale entry can meet its re-read copy: the counter breaks the tie.)
        self.ready: list[tuple[int, int, Job]] = []
        self._pushes = itertools.count()
        self.in_flight = 0
        # May have runnable jobs in Postgres we have not read.
        self.dirty = True
        # When the earliest known retry of this destination comes due (wall clock).
        self.next_due: datetime | None = None
        self.last_pickup: datetime | None = None
        self.wake = asyncio.Event()
        self.wake.set()
        # Two wake-up timers: when the earliest known retry comes due, and when the rate
        # limit lets the next delivery go. One shared timer let each cancel the other's.
        self._due_timer: asyncio.TimerHandle | None = None
        self._rate_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.task = asyncio.create_task(self._run(), name=f"lane-{destination.id}")

    # --- configuration -------------------------------------------------------------------

    def configure(self, destination: Destination, sender: Sender | None) -> None:
        resumed = self.destination.paused and not destination.paused
        if (destination.rate_per_second, destination.rate_burst) != (
                self.destination.rate_per_second, self.destination.rate_burst):
            self.rate.configure(destination.rate_per_second, destination.rate_burst)
        self.destination = destination
        self.policy = _policy(destination)
        if sender is not None:
            old, self.sender = self.sender, sender
            self._spawn(old.close())
        if resumed:
            self.dirty = True
        self.wake.set()

    # --- signals from the engine ---------------------------------------------------------

    def notify(self) -> None:
        """New jobs may be runnable (NOTIFY, poll, released waiters)."""
        self.dirty = True
        self.wake.set()

    def due_at(self, when: datetime) -> None:
        """A retry comes due then; read again at that time."""
        if self.next_due is None or when < self.next_due:
            self.next_due = when
            self._arm_due()

    def recorded(self, job_ids: list[int]) -> None:
        """These jobs' fate is committed: they leave memory, and frozen users may thaw."""
        thawed: set[str] = set()
        for job_id in job_ids:
            job = self.held.get(job_id)
            if job is None:
                continue
            if job.phase is Phase.WRITING:
                user = job.user_id
                self.frozen[user] -= 1
                if self.frozen[user] <= 0:
                    del self.frozen[user]
                    thawed.add(user)
            self._forget(job)
        if self._reading:
            self._thawed_while_reading |= thawed
        for user in thawed:
            # Jobs read while the user was frozen were only queued: let Postgres order them.
            for job in [j for j in self.keys.get(user, []) if j.phase is not Phase.FLIGHT]:
                self._forget(job)
            self.dirty = True
        self.wake.set()

    def reconsider(self) -> None:
        """An operator put old jobs back in front of newer ones (a retried abort): let
        Postgres order again everything we only queued. In-flight deliveries finish, and
        frozen users re-read when their writes commit anyway."""
        for job in list(self.held.values()):
            if job.phase in (Phase.QUEUED, Phase.READY) and job.user_id not in self.frozen:
                self._forget(job)
        if self._reading:
            self._reconsidered_while_reading = True
        self.notify()

    def drop_partitions(self, lost: set[int]) -> None:
        """Forget queued jobs of partitions this router no longer owns; in-flight ones finish
        and writes in progress complete."""
        for job in list(self.held.values()):
            if job.partition in lost and job.phase in (Phase.QUEUED, Phase.READY):
                self._forget(job)

    @property
    def idle(self) -> bool:
        return not self.held and not self.in_flight and not self.dirty and self.next_due is None

    @property
    def queued(self) -> int:
        return len(self.held) - self.in_flight

    async def close(self) -> None:
        for timer in (self._due_timer, self._rate_timer):
            if timer is not None:
                timer.cancel()
        await cancel_and_wait([self.task, *self._tasks])
        await self.sender.close()

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.destination.paused or self.engine.stopping:
                continue
            usable = self.engine.membership.usable()
            if not usable:
                continue
            try:
                if self._should_read():
                    await self._read(usable)
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
        settings = self.engine.settings
        # Read only when what we hold runs low: the read excludes everything held, and a small
        # exclusion list keeps it cheap.
        return self.dirty and len(self.held) <= settings.max_held - settings.batch \
            and len(self.ready) < self.destination.concurrency

    async def _read(self, usable: frozenset[int]) -> None:
        settings = self.engine.settings
        limit = min(settings.batch, settings.max_held - len(self.held))
        self._reading = True
        self._thawed_while_reading.clear()
        self._reconsidered_while_reading = False
        # Cleared before the read, not after: a notification that arrives while it runs may
        # be for jobs committed after its snapshot, and must make us read again.
        self.dirty = False
        try:
            read = await self.engine.reader.pickup(
                self.destination.destination_key, limit, usable, self.held.keys())
        except BaseException:
            self.dirty = True
            raise
        finally:
            self._reading = False
        self.last_pickup = datetime.now(UTC)
        candidates = read.candidates
        metrics.PICKUP_JOBS.observe(len(candidates))
        if not read.complete:
            self.dirty = True
        if self._reconsidered_while_reading:
            candidates = []
            self.dirty = True
        elif self._thawed_while_reading:
            candidates = [c for c in candidates if c.user_id not in self._thawed_while_reading]
            self.dirty = True
        parked: list[tuple[Job, int]] = []
        for candidate in candidates:
            job = Job.from_candidate(candidate)
            self.held[job.job_id] = job
            self.held_by_partition[job.partition] += 1
            user = job.user_id
            jobs = self.keys.setdefault(user, [])
            if candidate.held_by is not None:
                # Something earlier of its user is failed or waiting in Postgres: park it there,
                # behind that job, and freeze the user until it is written.
                job.phase = Phase.WRITING
                self.frozen[user] += 1
                parked.append((job, candidate.held_by))
                bisect.insort(jobs, job, key=_job_order)
            elif jobs:
                # Behind an earlier job of its user that we hold. Job order among the ones not
                # sent yet (an operator's retry can bring an older job back).
                bisect.insort(jobs, job, lo=1, key=_job_order)
            else:
                jobs.append(job)
                self._make_ready(job)
        if parked:
            self.engine.flusher.park(self, parked)
        if self.dirty:
            self.wake.set()

    async def _dispatch(self) -> None:
        destination = self.destination
        membership = self.engine.membership
        while self.ready and self.in_flight < destination.concurrency:
            wait = self.rate.try_take()
            if wait > 0:
                self._arm_rate(wait)
                return
            await self.engine.scheduler.acquire(destination.tenant_key, destination.destination_key)
            batch: list[Job] = []
            while self.ready and len(batch) < self.sender.max_batch \
                    and self.in_flight + len(batch) < destination.concurrency:
                _, _, job = heapq.heappop(self.ready)
                if job.phase is not Phase.READY:
                    continue  # forgotten meanwhile
                if not membership.may_deliver(job.partition):
                    self._forget(job)  # its partition is going, or gone, to another router
                elif job.user_id in self.frozen:
                    job.phase = Phase.QUEUED  # thawing drops and re-reads it
                else:
                    job.phase = Phase.FLIGHT
                    batch.append(job)
            if not batch:
                self.engine.scheduler.release()
                continue
            self.in_flight += len(batch)
            metrics.IN_FLIGHT.inc(len(batch))
            self._spawn(self._deliver(batch))

    async def _deliver(self, jobs: list[Job]) -> None:
        started = datetime.now(UTC)
        clock = time.perf_counter()
        try:
            results = await self.sender.deliver(jobs)
        except Exception as exc:  # a sender bug must not lose the jobs: they are retried
            log.exception("delivery failed unexpectedly",
                          extra={"destination": self.destination.id})
            results = [Result(Verdict.RETRY, "internal", repr(exc))] * len(jobs)
        finally:
            self.engine.scheduler.release()
            self.in_flight -= len(jobs)
            metrics.IN_FLIGHT.dec(len(jobs))
        seconds = time.perf_counter() - clock
        metrics.DELIVERY_SECONDS.labels(self.destination.type).observe(seconds)
        for job, result in zip(jobs, results, strict=True):
            self._settle(job, result, started, seconds)
        self.wake.set()
        self.engine.settled.set()

    def _settle(self, job: Job, result: Result, started: datetime, seconds: float) -> None:
        now = datetime.now(UTC)
        duration_ms = int(seconds * 1000)
        destination = self.destination
        metrics.ATTEMPTS.labels(destination.id, result.verdict.value).inc()
        if result.error_code == "429":
            self.rate.too_many_requests(result.retry_after)
        if result.verdict is Verdict.OK:
            metrics.END_TO_END_SECONDS.observe((now - job.created_at).total_seconds())
            self._finish(job, Outcome(job.job_id, job.attempt, "succeeded", started, duration_ms))
            return
        first = job.first_attempt_at or started
        if result.verdict is Verdict.RETRY and not gives_up(self.policy, job.attempt, first, now):
            delay = max(backoff_delay(self.policy, job.attempt), result.retry_after or 0.0)
            retry_at = now + timedelta(seconds=delay)
            outcome = Outcome(job.job_id, job.attempt, "failed", started, duration_ms,
                              result.error_code, result.response, retry_at)
            # The failed job and everything queued behind it are written together; the user
            # stays frozen until they are.
            followers = [j for j in self.keys.get(job.user_id, []) if j is not job
                         and j.phase in (Phase.QUEUED, Phase.READY)]
            for j in (job, *followers):
                j.phase = Phase.WRITING
            self.frozen[job.user_id] += 1 + len(followers)
            self.engine.flusher.add(self, outcome, park=[(f, job.job_id) for f in followers])
            self.due_at(retry_at)
            log.info("delivery failed; will retry", extra={
                "tenant": destination.tenant_id, "destination": destination.id,
                "job_id": job.job_id, "attempt": job.attempt,
                "error_code": result.error_code, "retry_in_s": round(delay, 1)})
            return
        reason = (f"gave up after {job.attempt} attempts over"
                  f" {int((now - first).total_seconds())}s" if result.verdict is Verdict.RETRY
                  else f"not retryable: {result.error_code}")
        log.warning("job aborted", extra={"tenant": destination.tenant_id,
                                          "destination": destination.id, "job_id": job.job_id,
                                          "attempt": job.attempt, "reason": reason})
        self._finish(job, Outcome(job.job_id, job.attempt, "aborted", started, duration_ms,
                                  result.error_code, result.response, None, reason))

    def _finish(self, job: Job, outcome: Outcome) -> None:
        """The job ended (succeeded or aborted): its user's next job may go."""
        job.phase = Phase.ENDED
        self.engine.flusher.add(self, outcome)
        jobs = self.keys.get(job.user_id)
        if jobs is None:
            return
        if job in jobs:
            jobs.remove(job)
        if not jobs:
            del self.keys[job.user_id]
        elif job.user_id not in self.frozen and jobs[0].phase is Phase.QUEUED:
            self._make_ready(jobs[0])

    def _make_ready(self, job: Job) -> None:
        job.phase = Phase.READY
        heapq.heappush(self.ready, (job.job_id, next(self._pushes), job))

    def _forget(self, job: Job) -> None:
        """Drop a job from memory; Postgres still has it, and a later read brings it back."""
        if self.held.pop(job.job_id, None) is not None:
            self.held_by_partition[job.partition] -= 1
        jobs = self.keys.get(job.user_id)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self.keys[job.user_id]
        if job.phase is Phase.READY:
            job.phase = Phase.QUEUED  # skipped when it comes up in `ready`

    def _arm_due(self) -> None:
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
        if self.next_due is not None:
            delay = max(0.0, (self.next_due - datetime.now(UTC)).total_seconds())
            self._due_timer = asyncio.get_running_loop().call_later(delay, self.wake.set)

    def _arm_rate(self, delay: float) -> None:
        if self._rate_timer is not None:
            self._rate_timer.cancel()
        self._rate_timer = asyncio.get_running_loop().call_later(delay, self.wake.set)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("lane task failed", exc_info=exc,
                      extra={"destination": self.destination.id})


def _job_order(job: Job) -> int:
    return job.job_id


def _policy(destination: Destination) -> RetryPolicy:
    return RetryPolicy(
        min_backoff=destination.min_backoff_ms / 1000,
        max_backoff=destination.max_backoff_ms / 1000,
        max_attempts=destination.max_attempts,
        max_retry_window=timedelta(seconds=destination.max_retry_window_s),
    )
