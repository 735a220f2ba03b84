"""The ordering barrier's core (router_service.barrier): pure bookkeeping, tested without an
event loop or a database.

The property test at the end drives the core against a small in-memory model of the queue's
rows (what jobsdb/sql/queue.sql's pickup, hold and record_outcomes do to them), interleaving
reads, sends, answers and commits at random the way the lane and the flusher can, and checks
what a receiver would see: no job is sent while an earlier job of its user is unfinished, and
each user's accepted jobs are in job order. The same property runs end to end through real
lanes, Postgres and sinks in tests/integration/test_router.py.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from jobsdb.queue import Candidate, Outcome
from router_service.barrier import Admitted, Barrier, Park
from router_service.model import Job, Phase
from router_service.retry import Result, RetryPolicy, Verdict

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(min_backoff=1.0, max_backoff=4.0, max_attempts=3,
                     max_retry_window=timedelta(0))
OK = Result(Verdict.OK)
RETRY = Result(Verdict.RETRY, "503", "busy")
ABORT = Result(Verdict.ABORT, "404", "gone")
EVERY_PARTITION = lambda partition: True  # noqa: E731


def candidate(job_id: int, user: str, *, held_by: int | None = None, attempts: int = 0,
              partition: int = 0) -> Candidate:
    return Candidate(job_id, user, f"m{job_id}", "pending", attempts, None, T0, "{}", partition,
                     held_by)


def settle(barrier: Barrier, job: Job, result: Result, now: datetime = T0) -> Outcome:
    barrier.returned(1)
    return barrier.settle(job, result, started=now, now=now, duration_ms=1, policy=POLICY,
                          rng=random.Random(0)).outcome


def ids(jobs: list[Job]) -> list[int]:
    return [job.job_id for job in jobs]


# ---- the rules, one by one ----


def test_only_each_users_head_is_ready_and_heads_go_in_job_order() -> None:
    barrier = Barrier()
    barrier.begin_read()
    admitted = barrier.admit([candidate(1, "a"), candidate(2, "b"), candidate(3, "a"),
                              candidate(4, "c")])
    assert admitted.parks == []
    assert not admitted.stale
    assert ids(barrier.take(10, EVERY_PARTITION)) == [1, 2, 4]
    assert barrier.in_flight == 3
    assert barrier.queued == 1


def test_a_success_lets_the_users_next_job_go() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "a")])
    (first,) = barrier.take(10, EVERY_PARTITION)
    assert barrier.take(10, EVERY_PARTITION) == []
    outcome = settle(barrier, first, OK)
    assert (outcome.job_id, outcome.state, outcome.attempt) == (1, "succeeded", 1)
    assert ids(barrier.take(10, EVERY_PARTITION)) == [2]
    # The ended job stays held until its outcome is on record, then leaves memory.
    assert 1 in barrier.held
    assert barrier.recorded([1]) is False
    assert 1 not in barrier.held


def test_a_retryable_failure_parks_the_users_queue_and_freezes_the_user() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "a"), candidate(3, "a"), candidate(4, "b")])
    first, other = barrier.take(10, EVERY_PARTITION)
    barrier.returned(1)
    settled = barrier.settle(first, RETRY, started=T0, now=T0, duration_ms=5, policy=POLICY,
                             rng=random.Random(0))
    assert settled.outcome.state == "failed"
    assert settled.outcome.error_code == "503"
    assert settled.outcome.retry_at == T0 + timedelta(seconds=settled.retry_in or 0)
    assert 0.5 <= (settled.retry_in or 0) <= 1.0  # the first backoff, jittered
    assert [(job.job_id, blocker) for job, blocker in settled.parks] == [(2, 1), (3, 1)]
    assert barrier.frozen["a"] == 3
    assert barrier.take(10, EVERY_PARTITION) == []  # nothing of a's goes meanwhile
    # Written: the user thaws, and the parked jobs leave memory (Postgres holds them now).
    assert barrier.recorded([1, 2, 3]) is True
    assert "a" not in barrier.frozen
    assert set(barrier.held) == {4}
    assert other.job_id == 4


def test_the_retry_waits_at_least_what_the_destination_asked() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a")])
    (job,) = barrier.take(1, EVERY_PARTITION)
    barrier.returned(1)
    settled = barrier.settle(job, Result(Verdict.RETRY, "429", "", retry_after=90.0),
                             started=T0, now=T0, duration_ms=1, policy=POLICY)
    assert settled.retry_in == 90.0


def test_a_job_read_with_a_holder_is_parked_behind_it_never_sent() -> None:
    barrier = Barrier()
    barrier.begin_read()
    admitted = barrier.admit([candidate(5, "a", held_by=2), candidate(6, "a"),
                              candidate(7, "b")])
    assert [(job.job_id, blocker) for job, blocker in admitted.parks] == [(5, 2)]
    assert ids(barrier.take(10, EVERY_PARTITION)) == [7]
    # Parked: a thaws, and what was only queued of a's (6) is dropped to be read again.
    assert barrier.recorded([5]) is True
    assert set(barrier.held) == {7}


def test_what_a_read_says_of_a_user_thawed_meanwhile_is_stale() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "a")])
    (job,) = barrier.take(1, EVERY_PARTITION)
    barrier.returned(1)
    barrier.settle(job, RETRY, started=T0, now=T0, duration_ms=1, policy=POLICY)
    barrier.begin_read()  # its snapshot predates the failure's commit ...
    barrier.recorded([1, 2])  # ... which lands while it runs
    admitted = barrier.admit([candidate(2, "a"), candidate(3, "b")])
    assert admitted.stale
    assert set(barrier.held) == {3}


def test_an_operators_reordering_during_a_read_makes_the_whole_read_stale() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a")])
    barrier.begin_read()
    barrier.reconsider()
    assert barrier.held == {}  # what was only queued is forgotten
    admitted = barrier.admit([candidate(1, "a"), candidate(2, "b")])
    assert admitted.stale
    assert barrier.held == {}


def test_an_older_job_brought_back_goes_before_the_queued_ones() -> None:
    """An operator's retry of an aborted job puts it back in front of its user's jobs."""
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(10, "a")])
    (head,) = barrier.take(1, EVERY_PARTITION)
    barrier.begin_read()
    barrier.admit([candidate(12, "a"), candidate(11, "a")])
    assert ids(barrier.keys["a"]) == [10, 11, 12]
    settle(barrier, head, OK)
    assert ids(barrier.take(5, EVERY_PARTITION)) == [11]


def test_an_abort_ends_the_job_with_its_reason_and_lets_the_next_go() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "a")])
    (job,) = barrier.take(5, EVERY_PARTITION)
    outcome = settle(barrier, job, ABORT)
    assert (outcome.state, outcome.reason) == ("aborted", "not retryable: 404")
    assert ids(barrier.take(5, EVERY_PARTITION)) == [2]


def test_retrying_gives_up_after_the_attempts_and_the_window() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a", attempts=2)])  # its third attempt, window 0
    (job,) = barrier.take(1, EVERY_PARTITION)
    outcome = settle(barrier, job, RETRY)
    assert outcome.state == "aborted"
    assert outcome.reason == "gave up after 3 attempts over 0s"


def test_jobs_of_partitions_no_longer_ours_are_forgotten_not_sent() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a", partition=1), candidate(2, "b", partition=2),
                   candidate(3, "c", partition=3)])
    barrier.drop_partitions({3})
    assert set(barrier.held) == {1, 2}
    assert ids(barrier.take(5, lambda partition: partition != 2)) == [1]
    assert set(barrier.held) == {1}
    assert barrier.held_by_partition[2] == 0


def test_a_frozen_users_head_is_not_taken() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "b")])
    barrier.begin_read()
    barrier.admit([candidate(3, "a", held_by=1)])  # a freezes while its head is ready
    assert ids(barrier.take(5, EVERY_PARTITION)) == [2]
    assert barrier.held[1].phase is Phase.QUEUED


def test_a_batch_carries_a_users_queued_jobs_behind_their_head_in_job_order() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "b"), candidate(3, "a"), candidate(4, "a"),
                   candidate(5, "b")])
    assert ids(barrier.take(10, EVERY_PARTITION, per_user=2)) == [1, 2, 3, 5]
    assert barrier.held[4].phase is Phase.QUEUED  # behind two of a's in flight


def test_a_batch_stops_at_its_limits() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(job, "a") for job in range(1, 6)])
    assert ids(barrier.take(3, EVERY_PARTITION, per_user=10)) == [1, 2, 3]  # events
    big = Barrier()
    big.begin_read()
    big.admit([candidate(job, f"u{job}") for job in range(1, 6)])  # payloads of 2 bytes
    assert ids(big.take(10, EVERY_PARTITION, per_user=10, max_bytes=5)) == [1, 2]  # bytes
    assert ids(big.take(10, EVERY_PARTITION, per_user=10, max_bytes=1)) == [3]  # one at least


def test_a_failed_batch_fails_each_job_in_it_and_parks_what_stayed_behind() -> None:
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "a"), candidate(3, "a")])
    first, second = barrier.take(10, EVERY_PARTITION, per_user=2)
    batch = Result(Verdict.RETRY, "503", "", batch="msg_b1_x")
    barrier.returned(2)
    one = barrier.settle(first, batch, started=T0, now=T0, duration_ms=1, policy=POLICY)
    two = barrier.settle(second, batch, started=T0, now=T0, duration_ms=1, policy=POLICY)
    assert (one.outcome.state, one.outcome.batch) == ("failed", "msg_b1_x")
    assert [(job.job_id, blocker) for job, blocker in one.parks] == [(3, 1)]
    assert (two.outcome.state, two.parks) == ("failed", [])  # it travelled: its own attempt
    assert barrier.frozen["a"] == 3
    assert barrier.take(10, EVERY_PARTITION, per_user=2) == []


# ---- the property, against a model of the queue's rows ----


@dataclass
class Row:
    user: str
    state: str = "pending"
    attempts: int = 0
    blocked_by: int | None = None
    retry_at: datetime | None = None
    first_attempt_at: datetime | None = None


class Queue:
    """What jobsdb/sql/queue.sql does to one destination's rows, in Python."""

    def __init__(self, users: list[str]) -> None:
        self.rows = {job_id: Row(user) for job_id, user in enumerate(users, start=1)}

    def pickup(self, limit: int, exclude: set[int], now: datetime) -> list[Candidate]:
        runnable = sorted(
            job_id for job_id, row in self.rows.items() if job_id not in exclude and (
                row.state == "pending"
                or (row.state == "failed" and row.retry_at is not None and row.retry_at <= now)))
        return [Candidate(job_id, row.user, f"m{job_id}", row.state, row.attempts,
                          row.first_attempt_at, T0, "{}", 0, self.holder(job_id))
                for job_id in runnable[:limit] for row in (self.rows[job_id],)]

    def holder(self, job_id: int) -> int | None:
        """job_holder() of jobsdb/migrations/0007_barrier.sql."""
        user = self.rows[job_id].user
        for earlier in sorted(self.rows):
            row = self.rows[earlier]
            if earlier >= job_id:
                return None
            if row.user == user and row.state in ("failed", "waiting"):
                root = row.blocked_by or earlier
                return None if root == job_id else root
        return None

    def record(self, outcome: Outcome) -> None:
        row = self.rows[outcome.job_id]
        if row.state not in ("pending", "failed") or row.attempts >= outcome.attempt:
            return
        row.state, row.attempts, row.retry_at = outcome.state, outcome.attempt, outcome.retry_at
        row.first_attempt_at = row.first_attempt_at or outcome.started_at
        if outcome.state in ("succeeded", "aborted"):
            for waiter in self.rows.values():
                if waiter.state == "waiting" and waiter.blocked_by == outcome.job_id:
                    waiter.state, waiter.blocked_by = "pending", None

    def hold(self, parks: list[Park]) -> set[int]:
        parked = set()
        for job, blocker in parks:
            row, live = self.rows[job.job_id], self.rows[blocker]
            if (row.state in ("pending", "failed") and blocker != job.job_id
                    and live.state in ("pending", "failed", "waiting")
                    and live.blocked_by != job.job_id):
                row.state, row.blocked_by, row.retry_at = "waiting", blocker, None
                parked.add(job.job_id)
        return parked


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), users=st.integers(1, 6), jobs=st.integers(1, 40),
       batch=st.integers(1, 8), whole=st.booleans())
def test_receivers_see_each_users_jobs_in_order_under_any_interleaving(
    seed: int, users: int, jobs: int, batch: int, whole: bool
) -> None:
    """`whole`: batches a destination takes whole (a webhook's JSON array: one answer for
    all, several jobs of a user, in order); else batches answered job by job, one job of a
    user each (a gRPC sink's)."""
    rng = random.Random(seed)
    queue = Queue([f"u{rng.randrange(users)}" for _ in range(jobs)])
    barrier = Barrier()
    writes: deque[tuple[Outcome | None, list[Park]]] = deque()  # the flusher, in order
    answers: list[list[Job]] = []  # batches sent, not yet answered
    per_user = batch if whole else 1
    snapshot: list[Candidate] | None = None  # a read in progress
    accepted: dict[str, list[int]] = defaultdict(list)  # what the receiver took, per user
    finished: set[int] = set()  # answered OK, or given up on
    now = T0
    for step in range(5000):
        if all(row.state in ("succeeded", "aborted") for row in queue.rows.values()):
            break
        draining = step > 3000  # then the destination recovers, so that everything ends
        action = rng.randrange(7)
        if action == 0 and snapshot is None:
            barrier.begin_read()
            snapshot = queue.pickup(rng.randint(1, 10), set(barrier.held), now)
        elif action == 1 and snapshot is not None:
            admitted = barrier.admit(snapshot)
            snapshot = None
            if admitted.parks:
                writes.append((None, admitted.parks))
        elif action == 2:
            sent = barrier.take(batch, EVERY_PARTITION, per_user=per_user)
            assert sent == sorted(sent, key=lambda j: j.job_id)
            for job in sent:
                user = queue.rows[job.job_id].user
                # Every earlier job of its user is finished, or travels before it in this
                # batch (a receiver takes an array in order).
                unfinished = [j for j, row in queue.rows.items()
                              if j < job.job_id and row.user == user and j not in finished
                              and j not in {s.job_id for s in sent}]
                assert unfinished == [], f"job {job.job_id} sent before {unfinished}"
            if sent:
                answers.append(sent)
        elif action == 3 and answers:
            sent = answers.pop(rng.randrange(len(answers)))
            barrier.returned(len(sent))
            verdict = _roll(rng, draining)
            results = [verdict if whole else _roll(rng, draining) for _ in sent]
            if all(result is OK for result in results) and rng.random() < 0.5:
                # All OK: the lane settles them in one call.
                for job, outcome in barrier.settle_ok(sent, results, started=now,
                                                      duration_ms=1):
                    accepted[queue.rows[job.job_id].user].append(job.job_id)
                    finished.add(job.job_id)
                    writes.append((outcome, []))
                continue
            for job, result in zip(sent, results, strict=True):
                settled = barrier.settle(job, result, started=now, now=now, duration_ms=1,
                                         policy=POLICY, rng=rng)
                if result is OK:
                    accepted[queue.rows[job.job_id].user].append(job.job_id)
                if settled.outcome.state in ("succeeded", "aborted"):
                    finished.add(job.job_id)
                writes.append((settled.outcome, settled.parks))
        elif action == 4 and writes:
            outcome, parks = writes.popleft()
            if outcome is not None:
                queue.record(outcome)
            # A job that could not be parked (its blocker ended meanwhile) stays runnable:
            # the next read finds it.
            queue.hold(parks)
            barrier.recorded([*([outcome.job_id] if outcome else []),
                              *(job.job_id for job, _ in parks)])
        elif action == 5:
            now += timedelta(seconds=rng.choice([0.5, 1, 2, 5]))
        elif action == 6 and rng.random() < 0.1:
            barrier.reconsider()
        # A user's list holds only jobs held and not ended (recorded() relies on it).
        assert all(j.phase is not Phase.ENDED and barrier.held.get(j.job_id) is j
                   for user_jobs in barrier.keys.values() for j in user_jobs)
    else:
        raise AssertionError("the queue never drained")
    for user, job_ids in accepted.items():
        ours = [j for j, row in queue.rows.items() if row.user == user]
        assert job_ids == sorted(job_ids), f"{user} received {job_ids}"
        succeeded = [j for j in ours if queue.rows[j].state == "succeeded"]
        assert sorted(set(job_ids)) == succeeded


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_admitting_logged_jobs_at_once_is_taking_them_in_one_by_one(
        data: st.DataObject) -> None:
    """admit_logged's fast path (a user's jobs coming in after what is held of them) leaves
    the barrier as _take_in, the general rule, does: the same jobs held, in the same order
    per user, the same frozen users, parks and ready heads."""
    fast, slow = Barrier(), Barrier()
    for _ in range(data.draw(st.integers(1, 4))):
        specs = data.draw(st.lists(st.tuples(st.integers(1, 60), st.sampled_from("abc"),
                                             st.sampled_from([None, None, None, 7])),
                                   max_size=12))
        pairs = [(_logged(job_id, user), held_by) for job_id, user, held_by in specs]
        got = fast.admit_logged(pairs)
        want = [(job.job_id, blocker) for job, blocker in got.parks]
        again = [(_logged(job.job_id, job.user_id), held_by) for job, held_by in pairs]
        expected = Admitted()
        for job, held_by in again:
            if job.job_id not in slow.held:
                slow._take_in(job, held_by, expected)
        assert want == [(job.job_id, blocker) for job, blocker in expected.parks]
        assert set(fast.held) == set(slow.held)
        assert {u: ids(js) for u, js in fast.keys.items()} == {
            u: ids(js) for u, js in slow.keys.items()}
        assert fast.frozen == slow.frozen
        assert fast.held_by_partition == slow.held_by_partition
        assert ids(fast.take(100, EVERY_PARTITION)) == ids(slow.take(100, EVERY_PARTITION))


def _logged(job_id: int, user: str) -> Job:
    return Job(job_id, user, f"m{job_id}", 1, "{}", T0, None, job_id % 3, logged=True,
               event_id=job_id)


def test_a_delivery_given_up_on_leaves_memory_with_its_users_queued_jobs() -> None:
    """The lease lapsed mid-delivery: nothing is known of the attempt, so the job and what of
    its user was only queued behind it go back to Postgres's keeping; others stay."""
    barrier = Barrier()
    barrier.begin_read()
    barrier.admit([candidate(1, "a"), candidate(2, "a"), candidate(3, "b"), candidate(4, "b")])
    sent = barrier.take(10, EVERY_PARTITION)
    assert ids(sent) == [1, 3]
    barrier.returned(1)
    barrier.abandon([sent[0]])
    assert set(barrier.held) == {3, 4}
    assert "a" not in barrier.keys
    # And when the lease lapses, nothing only queued is trusted any more.
    barrier.drop_queued()
    assert set(barrier.held) == {3}  # in flight: its answer still comes


def _roll(rng: random.Random, draining: bool) -> Result:
    roll = rng.random()
    return OK if draining or roll < 0.6 else RETRY if roll < 0.9 else ABORT
