"""A job as the router holds it in memory between reading it and recording its outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from jobsdb.queue import Candidate


class Phase(Enum):
    # Waiting in memory behind an earlier job of its user.
    QUEUED = "queued"
    # The head of its user's queue, waiting for capacity.
    READY = "ready"
    # Being delivered.
    FLIGHT = "flight"
    # Its failure, or its parking behind a blocker, is being written to Postgres.
    WRITING = "writing"
    # Succeeded or aborted; the outcome is being written.
    ENDED = "ended"


@dataclass(slots=True)
class Job:
    job_id: int
    user_id: str
    message_id: str
    # The number of this attempt (the attempts recorded so far, plus one).
    attempt: int
    payload: str
    created_at: datetime
    first_attempt_at: datetime | None
    partition: int
    phase: Phase = Phase.QUEUED

    @classmethod
    def from_candidate(cls, c: Candidate) -> Job:
        return cls(c.job_id, c.user_id, c.message_id, c.attempts + 1, c.payload, c.created_at,
                   c.first_attempt_at, c.ordering_partition)
