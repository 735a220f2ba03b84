"""The ordering barrier in memory: one destination's jobs between reading and recording.

Pure bookkeeping, no I/O and no event loop, so every rule here has a unit test that runs in
microseconds (tests/unit/test_barrier.py). The lane (router_service.lane) does the reading, sending
and writing, and asks this core what may go and what its answers mean.

What it keeps:
- one queue per user, in job order, of the jobs held in memory; only each queue's head is
  *ready*, so a user's jobs reach the destination one after another, in order;
- the ready heads in a heap by job id, so the destination gets its jobs in job order as far as
  per-user order and capacity allow (what PeekJobs shows);
- *frozen* users: a park or a failure of theirs is being written to Postgres, and Postgres and
  memory may disagree about what comes next until it commits. Nothing of theirs goes out
  meanwhile; when the write is on record they *thaw*, and whatever of theirs was only queued is
  dropped from memory and read again, in job order, with Postgres's verdict;
- everything read stays *held* (excluded from the next read) until its fate is committed, so
  nothing is read twice.

Postgres has the last word on order: a job read with a holder (`held_by`, the SQL barrier
rule job_holder()) is parked behind it, never sent. A job read from the event log (it has no
row) whose user has an unfinished row at the destination is parked the same way.

Jobs come two ways: rows (failed, released, retried: `admit`) and the event log (`admit`
too, as candidates with what holds them). A job that leaves memory before its fate is
recorded (`forget`) is read again later; for a logged job the lane learns of it through
`on_forget`, since reading it again means reading its partition again from where the
destination's jobs are all settled (router_service.tracks).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from jobsdb.queue import Candidate, Outcome
from router_service.model import Job, Phase
from router_service.retry import Result, RetryPolicy, Verdict, backoff_delay, gives_up

Park = tuple[Job, int]  # a job and the job it must wait behind


@dataclass(slots=True)
class Admitted:
    """What a read brought in."""

    # Jobs to park behind their holder in Postgres (their users are frozen until written).
    parks: list[Park] = field(default_factory=list)
    # Some of what the read returned was stale and dropped: read again.
    stale: bool = False


@dataclass(slots=True)
class Settlement:
    """What one answer of the destination means for one job, for the lane to write down."""

    outcome: Outcome
    # Retryable failure: the user's queued jobs, to park behind this one with its outcome.
    parks: list[Park] = field(default_factory=list)
    # Retryable failure: seconds until the retry (the backoff, or what the destination asked).
    retry_in: float | None = None


class Barrier:
    def __init__(self, on_forget: Callable[[Job], None] = lambda job: None) -> None:
        # Told of every logged job that leaves memory before its fate is recorded.
        self._on_forget = on_forget
        # Read and not yet recorded: excluded from the next read.
        self.held: dict[int, Job] = {}
        self.held_by_partition: Counter[int] = Counter()
        # Per user: the jobs held of them (except ended ones), in job order.
        self.keys: dict[str, list[Job]] = {}
        # Users with a park or failure being written: nothing of theirs goes out meanwhile.
        self.frozen: Counter[str] = Counter()
        # Users' heads that may go now, smallest job id first. A forgotten job's stale entry
        # can meet its re-read copy: the push counter breaks the tie.
        self.ready: list[tuple[int, int, Job]] = []
        self._pushes = itertools.count()
        self.in_flight = 0
        # Users thawed while a read was running. That read's snapshot predates the commit
        # that thawed them, so what it says about them is stale: they are read again.
        self._reading = False
        self._thawed_while_reading: set[str] = set()
        # An operator reordered jobs while a read was running: that read is stale entirely.
        self._reconsidered_while_reading = False

    @property
    def queued(self) -> int:
        """Held and not in flight."""
        return len(self.held) - self.in_flight

    @property
    def empty(self) -> bool:
        return not self.held and not self.in_flight

    @property
    def reading(self) -> bool:
        return self._reading

    # --- reading -------------------------------------------------------------------------

    def begin_read(self) -> None:
        """A read is about to take its snapshot; what commits meanwhile makes parts stale."""
        self._reading = True
        self._thawed_while_reading.clear()
        self._reconsidered_while_reading = False

    def read_failed(self) -> None:
        self._reading = False

    def admit(self, candidates: Iterable[Candidate]) -> Admitted:
        """Take in what the read found, in job order."""
        self._reading = False
        admitted = Admitted()
        if self._reconsidered_while_reading:
            admitted.stale = True
            return admitted
        thawed = self._thawed_while_reading
        for candidate in candidates:
            if candidate.user_id in thawed:
                admitted.stale = True
                continue
            self._take_in(Job.from_candidate(candidate), candidate.held_by, admitted)
        return admitted

    def admit_logged(self, jobs: Iterable[tuple[Job, int | None]]) -> Admitted:
        """Take in jobs read from the event log, in job order, each with the job its user
        waits behind at this destination (None: nothing of theirs has an unfinished row)."""
        admitted = Admitted()
        held = self.held
        by_partition = self.held_by_partition
        keys = self.keys
        for job, held_by in jobs:
            job_id = job.job_id
            if job_id in held:
                continue  # read again while still held (an overlapping read)
            if held_by is not None or job.user_id in keys:
                self._take_in(job, held_by, admitted)
                continue
            # The usual case, as _take_in does it: nothing of its user in Postgres or here.
            held[job_id] = job
            by_partition[job.partition] += 1
            keys[job.user_id] = [job]
            self._make_ready(job)
        return admitted

    def _take_in(self, job: Job, held_by: int | None, admitted: Admitted) -> None:
        user = job.user_id
        self.held[job.job_id] = job
        self.held_by_partition[job.partition] += 1
        jobs = self.keys.setdefault(user, [])
        if held_by is not None:
            # Something earlier of its user is unfinished in Postgres: park it there,
            # behind that job, and freeze the user until it is written.
            job.phase = Phase.WRITING
            self.frozen[user] += 1
            admitted.parks.append((job, held_by))
            bisect.insort(jobs, job, key=_job_order)
        elif jobs:
            # Behind an earlier job of its user that we hold. Job order among the ones not
            # sent yet (an operator's retry can bring an older job back).
            bisect.insort(jobs, job, lo=1, key=_job_order)
        else:
            jobs.append(job)
            self._make_ready(job)

    # --- sending -------------------------------------------------------------------------

    def take(self, limit: int, may_deliver: Callable[[int], bool], *, per_user: int = 1,
             max_bytes: int | None = None) -> list[Job]:
        """Up to `limit` ready jobs to send together, in job order. `may_deliver(partition)`:
        is that partition still ours? A job of a partition that is not is forgotten (its new
        owner reads it).

        A user's head job goes with up to `per_user - 1` of the jobs queued right behind it
        (a batch the destination takes whole, in order: a JSON array); with 1, a batch holds
        one job per user, so its jobs may be processed in any order. No job goes with or
        ahead of an earlier one of its user that is failed or waiting: those are never read
        as ready, and their users are frozen. `max_bytes` caps the payloads' total (a first
        job larger than it still goes, alone)."""
        batch: list[Job] = []
        size = 0
        # Whether each partition is still ours, asked once per partition in a take.
        ours: dict[int, bool] = {}
        while self.ready and len(batch) < limit:
            _, _, job = heapq.heappop(self.ready)
            if job.phase is not Phase.READY:
                continue  # forgotten meanwhile
            partition = job.partition
            mine = ours.get(partition)
            if mine is None:
                mine = ours[partition] = may_deliver(partition)
            if not mine:
                self.forget(job)
                continue
            if job.user_id in self.frozen:
                job.phase = Phase.QUEUED  # thawing drops and re-reads it
                continue
            if max_bytes is not None and batch and size + len(job.payload) > max_bytes:
                self._push(job)  # next time
                break
            job.phase = Phase.FLIGHT
            batch.append(job)
            size += len(job.payload)
            if per_user > 1 and len(self.keys[job.user_id]) > 1:
                size = self._take_followers(job, batch, limit, per_user, max_bytes, size)
        if per_user > 1:
            batch.sort(key=_job_order)
        self.in_flight += len(batch)
        return batch

    def _take_followers(self, head: Job, batch: list[Job], limit: int, per_user: int,
                        max_bytes: int | None, size: int) -> int:
        """The jobs queued right behind `head`, into the batch after it (returns the size)."""
        jobs = self.keys[head.user_id]
        taken = 1
        for job in jobs[jobs.index(head) + 1:]:
            if (job.phase is not Phase.QUEUED or taken >= per_user or len(batch) >= limit
                    or (max_bytes is not None and size + len(job.payload) > max_bytes)):
                break
            job.phase = Phase.FLIGHT
            batch.append(job)
            size += len(job.payload)
            taken += 1
        return size

    def returned(self, count: int) -> None:
        """Deliveries of `count` jobs came back (their answers are settled next)."""
        self.in_flight -= count

    def settle(self, job: Job, result: Result, *, started: datetime, now: datetime,
               duration_ms: int, policy: RetryPolicy, may_give_up: bool = True,
               rng: random.Random | None = None) -> Settlement:
        """Turn the destination's answer into the job's outcome and move the user along:
        success or abort lets the user's next job go; a retryable failure parks the user's
        queued jobs behind this one and freezes the user until that is written.
        `may_give_up=False` (an open circuit: the destination is known to be down) retries
        whatever the policy's attempts and window say."""
        if result.verdict is Verdict.OK:
            return self._finish(job, Outcome(job.job_id, job.attempt, "succeeded", started,
                                             duration_ms, batch=result.batch))
        first = job.first_attempt_at or started
        if result.verdict is Verdict.RETRY and not (
                may_give_up and gives_up(policy, job.attempt, first, now)):
            delay = max(backoff_delay(policy, job.attempt, rng), result.retry_after or 0.0)
            outcome = Outcome(job.job_id, job.attempt, "failed", started, duration_ms,
                              result.error_code, result.response,
                              now + timedelta(seconds=delay), batch=result.batch)
            followers = [j for j in self.keys.get(job.user_id, ()) if j is not job
                         and j.phase in (Phase.QUEUED, Phase.READY)]
            for j in (job, *followers):
                j.phase = Phase.WRITING
            self.frozen[job.user_id] += 1 + len(followers)
            return Settlement(outcome, [(f, job.job_id) for f in followers], delay)
        reason = (f"gave up after {job.attempt} attempts over"
                  f" {int((now - first).total_seconds())}s" if result.verdict is Verdict.RETRY
                  else f"not retryable: {result.error_code}")
        return self._finish(job, Outcome(job.job_id, job.attempt, "aborted", started,
                                         duration_ms, result.error_code, result.response,
                                         None, reason, result.batch))

    def settle_ok(self, jobs: Sequence[Job], results: Sequence[Result], *,
                  started: datetime, duration_ms: int) -> list[tuple[Job, Outcome]]:
        """`settle` for a delivery whose every job was answered OK (the usual case), in one
        call: each job succeeded and its user's next job may go."""
        end = self._end
        succeeded = []
        for job, result in zip(jobs, results, strict=True):
            end(job)
            succeeded.append((job, Outcome(job.job_id, job.attempt, "succeeded", started,
                                           duration_ms, batch=result.batch)))
        return succeeded

    # --- what Postgres has recorded ------------------------------------------------------

    def recorded(self, job_ids: Iterable[int]) -> bool:
        """These jobs' fate is committed: they leave memory, and frozen users may thaw.
        True when users thawed: what of theirs was only queued is dropped, to be read again."""
        thawed: set[str] = set()
        held = self.held
        by_partition = self.held_by_partition
        for job_id in job_ids:
            job = held.get(job_id)
            if job is None:
                continue
            if job.phase is Phase.ENDED:
                # Out of its user's list already (_finish): only the held entry is left.
                del held[job_id]
                by_partition[job.partition] -= 1
                continue
            if job.phase is Phase.WRITING:
                user = job.user_id
                self.frozen[user] -= 1
                if self.frozen[user] <= 0:
                    del self.frozen[user]
                    thawed.add(user)
            self._drop(job)
        if self._reading:
            self._thawed_while_reading |= thawed
        for user in thawed:
            # Jobs read while the user was frozen were only queued: let Postgres order them.
            for job in [j for j in self.keys.get(user, ()) if j.phase is not Phase.FLIGHT]:
                self.forget(job)
        return bool(thawed)

    def reconsider(self) -> None:
        """An operator put old jobs back in front of newer ones (a retried abort): forget what
        is only queued, so Postgres orders it again. In-flight deliveries finish, and frozen
        users are read again when their writes commit anyway."""
        for job in list(self.held.values()):
            if job.phase in (Phase.QUEUED, Phase.READY) and job.user_id not in self.frozen:
                self.forget(job)
        if self._reading:
            self._reconsidered_while_reading = True

    def drop_partitions(self, lost: Sequence[int] | set[int]) -> None:
        """Forget queued jobs of partitions no longer ours; in-flight ones finish and writes
        in progress complete."""
        for job in list(self.held.values()):
            if job.partition in lost and job.phase in (Phase.QUEUED, Phase.READY):
                self.forget(job)

    def abandon(self, jobs: Sequence[Job]) -> None:
        """Deliveries cancelled without an answer (the lease lapsed, the lane closed): nothing
        is known of them, so their jobs leave memory with whatever of their users is only
        queued; a later read brings them back in Postgres's order."""
        users = {job.user_id for job in jobs}
        for job in jobs:
            self.forget(job)
        for user in users:
            for job in [j for j in self.keys.get(user, ())
                        if j.phase in (Phase.QUEUED, Phase.READY)]:
                self.forget(job)

    def drop_queued(self) -> None:
        """Forget everything only queued (the lease lapsed: what it says may be stale)."""
        for job in list(self.held.values()):
            if job.phase in (Phase.QUEUED, Phase.READY):
                self.forget(job)

    def forget(self, job: Job) -> None:
        """Drop a job from memory; Postgres still has it, and a later read brings it back."""
        if self._drop(job) and job.logged:
            self._on_forget(job)

    def _drop(self, job: Job) -> bool:
        """Take a job out of memory; returns whether it was held."""
        held = self.held.pop(job.job_id, None) is not None
        if held:
            self.held_by_partition[job.partition] -= 1
        jobs = self.keys.get(job.user_id)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del self.keys[job.user_id]
        if job.phase is Phase.READY:
            job.phase = Phase.QUEUED  # skipped when it comes up in `ready`
        return held

    # --- inside --------------------------------------------------------------------------

    def _finish(self, job: Job, outcome: Outcome) -> Settlement:
        self._end(job)
        return Settlement(outcome)

    def _end(self, job: Job) -> None:
        """The job ended (succeeded or aborted): its user's next job may go."""
        job.phase = Phase.ENDED
        jobs = self.keys.get(job.user_id)
        if jobs is not None:
            if jobs[0] is job:
                del jobs[0]  # the usual place: a user's head is the job that goes
            elif job in jobs:
                jobs.remove(job)
            if not jobs:
                del self.keys[job.user_id]
            elif job.user_id not in self.frozen and jobs[0].phase is Phase.QUEUED:
                self._make_ready(jobs[0])

    def _make_ready(self, job: Job) -> None:
        job.phase = Phase.READY
        self._push(job)

    def _push(self, job: Job) -> None:
        heapq.heappush(self.ready, (job.job_id, next(self._pushes), job))


def _job_order(job: Job) -> int:
    return job.job_id
