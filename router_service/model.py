"""A job as the router holds it in memory between reading it and recording its outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from jobsdb.eventlog import LoggedEvent
from jobsdb.keyspace import job_id as make_job_id
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


# Compared by identity: the barrier finds and removes a job in its user's list by `in` and
# `remove`, which compared every field of every job ahead of it (payloads included), and a
# job read again after it was forgotten is another job, not the same one.
@dataclass(slots=True, eq=False)
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
    # Read from the event log, with no row of its own (yet): its first attempt. What becomes
    # of it is recorded by a deliveries row and the cursors, or by a new row (failed, aborted,
    # parked behind its user's), not by updating a row.
    logged: bool = False
    # The event's id and source and tenant (a logged job's new row needs them).
    event_id: int = 0
    source_key: int = 0
    tenant_key: int = 0
    # The event's W3C traceparent (None: sent without one): senders pass it on.
    traceparent: str | None = None

    @classmethod
    def from_candidate(cls, c: Candidate) -> Job:
        return cls(c.job_id, c.user_id, c.message_id, c.attempts + 1, c.payload, c.created_at,
                   c.first_attempt_at, c.ordering_partition, traceparent=c.traceparent)

    @classmethod
    def from_event(cls, event: LoggedEvent, slot: int) -> Job:
        return cls(make_job_id(event.event_id, slot), event.user_id, event.message_id, 1,
                   event.document, event.created_at, None, event.partition, Phase.QUEUED,
                   True, event.event_id, event.source_key, event.tenant_key, event.traceparent)
