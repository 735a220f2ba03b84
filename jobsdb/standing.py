"""Where one event stands at each destination of its source: the one definition GetJob and
GetEvent share (jobsdb.events), read from the jobs' rows and their history, the deliveries
recorded from the log, and the cursors.

A job with a row has its history in job_statuses; a job delivered from the log has its
delivery's record (deliveries); one without either is pending above its destination's
cursor, or no job at all (NotAJob says why: the connection's filter or the destinations the
event named kept it out, the connection was disabled, or it was not connected then).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson
from psycopg.rows import class_row, dict_row

from filterlang.errors import FilterError
from filterlang.events import compile_event_filter
from jobsdb.errors import NotFound
from jobsdb.jobs import Conn, JobRow, StatusRow, with_job_columns
from jobsdb.keyspace import event_of, slot_of
from jobsdb.keyspace import job_id as job_id_of
from jobsdb.sqlfile import query


@dataclass(frozen=True, slots=True)
class NotAJob:
    """Why an (event, connection) pair is no job at its destination: `missing` (no such
    event or connection in the caller's scope), `named` (the event named other
    destinations), `disabled` (the connection is disabled and its routers have not read it),
    `filtered` (the connection's filter keeps it out), `settled` (read there and settled
    without a delivery: its filter or the connections at the time kept it out)."""

    why: str
    event_id: int

    def message(self, job_id: int) -> str:
        if self.why in ("missing", "named", "disabled", "filtered"):
            return f"job {job_id} not found"
        return (f"job {job_id} not found (event {self.event_id} was not delivered to that"
                " destination: its connection's filter or the destinations it named kept"
                " it out)")


async def get_job(conn: Conn, job_id: int, scope: int | None) -> tuple[JobRow, list[StatusRow]]:
    """One job with every attempt and operator action (see job_status); NotFound when the
    pair is no job."""
    found = await job_status(conn, job_id, scope)
    if isinstance(found, NotAJob):
        raise NotFound(found.message(job_id))
    return found


async def job_status(conn: Conn, job_id: int, scope: int | None
                     ) -> tuple[JobRow, list[StatusRow]] | NotAJob:
    """What became of one (event, destination) pair: event_standing for one slot."""
    found = await event_standing(conn, event_of(job_id), [slot_of(job_id)], scope)
    return found[slot_of(job_id)]


async def event_standing(conn: Conn, event_id: int, slots: Sequence[int], scope: int | None
                         ) -> dict[int, tuple[JobRow, list[StatusRow]] | NotAJob]:
    """What became of an event at the connections of these slots (its jobs there), the one
    definition GetJob and GetEvent share, in four statements however many slots: a job with
    a row has its history in job_statuses; a job delivered from the log has its delivery's
    record (deliveries); one without either is pending above its destination's cursor, or
    no job at all (NotAJob says why)."""
    job_ids = [job_id_of(event_id, slot) for slot in slots]
    cur = conn.cursor(row_factory=class_row(JobRow))
    await cur.execute(with_job_columns("get_row"), {"job_ids": job_ids, "scope": scope})
    rows = {r.job_id: r for r in await cur.fetchall()}
    history = await _history(conn, job_ids)
    delivered = await _deliveries(conn, event_id, slots)
    logged = await _logged_jobs(conn, event_id, slots, scope)
    found: dict[int, tuple[JobRow, list[StatusRow]] | NotAJob] = {}
    for slot, job_id in zip(slots, job_ids, strict=True):
        row = rows.get(job_id)
        sent = delivered.get(slot, [])
        if row is not None:
            # Its first attempt may have gone well from the log before an operator replayed it.
            found[slot] = (row, sorted([*sent, *history.get(job_id, [])],
                                       key=lambda s: s.started_at))
            continue
        derived = logged.get(slot, NotAJob("missing", event_id))
        if isinstance(derived, NotAJob):
            found[slot] = derived
        elif sent:
            first = sent[0]
            found[slot] = (dataclasses.replace(derived, state="succeeded", attempts=1,
                                               first_attempt_at=first.started_at,
                                               updated_at=first.started_at),
                           [*history.get(job_id, []), *sent])
        elif derived.state == "succeeded":
            # Below the cursor with no delivery on record: a filter took it out then.
            found[slot] = NotAJob("settled", event_id)
        else:
            found[slot] = (derived, history.get(job_id, []))
    return found


async def _logged_jobs(conn: Conn, event_id: int, slots: Sequence[int], scope: int | None
                       ) -> dict[int, JobRow | NotAJob]:
    """The event's jobs without rows at these slots, as the log and the cursors say."""
    cur = conn.cursor(row_factory=class_row(_EventJob))
    await cur.execute(query("jobs.sql", "get_event_job"),
                      {"event_id": event_id, "slots": list(slots), "scope": scope})
    found: dict[int, JobRow | NotAJob] = {}
    for job in await cur.fetchall():
        if job.destinations is not None and job.destination_key not in job.destinations:
            found[job.slot] = NotAJob("named", event_id)
            continue
        pending = event_id > job.cursor
        if pending and not job.enabled:
            found[job.slot] = NotAJob("disabled", event_id)
        elif pending and not _takes(job.event_filter, job.document):
            found[job.slot] = NotAJob("filtered", event_id)
        else:
            found[job.slot] = JobRow(
                job_id=job_id_of(event_id, job.slot), tenant_id=job.tenant_id,
                source_id=job.source_id, destination_id=job.destination_id,
                user_id=job.user_id, message_id=job.message_id,
                state="pending" if pending else "succeeded", attempts=0 if pending else 1,
                retry_at=None, blocked_by=None, error_code=None, created_at=job.created_at,
                updated_at=job.created_at, first_attempt_at=None, payload=job.document,
                traceparent=job.traceparent)
    return found


@dataclass(frozen=True, slots=True)
class _EventJob:
    """A job without a row, as sql/jobs.sql `get_event_job` finds it."""

    event_id: int
    created_at: datetime
    user_id: str
    message_id: str
    # The destinations the event named (None: every connection).
    destinations: list[int] | None
    document: str
    destination_key: int
    enabled: bool
    event_filter: str | None
    # Where the destination's cursor is in the event's partition.
    cursor: int
    tenant_id: str
    source_id: str
    destination_id: str
    traceparent: str | None
    # The connection's number within its source (the job id's low bits).
    slot: int


def _takes(event_filter: str | None, document: str) -> bool:
    if not event_filter:
        return True
    try:
        compiled = compile_event_filter(event_filter)
    except FilterError:
        return False
    if compiled is None:
        return True
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError:  # numbers beyond a double: as the routers read it
        parsed = json.loads(document)
    return compiled.matches(parsed)


async def _history(conn: Conn, job_ids: list[int]) -> dict[int, list[StatusRow]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("jobs.sql", "history"), {"job_ids": job_ids})
    found: dict[int, list[StatusRow]] = {}
    for row in await cur.fetchall():
        job_id = row.pop("job_id")
        found.setdefault(job_id, []).append(StatusRow(**row))
    return found


async def _deliveries(conn: Conn, event_id: int, slots: Sequence[int]
                      ) -> dict[int, list[StatusRow]]:
    """The event's deliveries from the log to the destinations of these slots, as history
    entries (its first attempt, or the repeats of one delivered again after a crash)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("jobs.sql", "delivered"), {"event_id": event_id, "slots": list(slots)})
    found: dict[int, list[StatusRow]] = {}
    for row in await cur.fetchall():
        found.setdefault(row["slot"], []).append(StatusRow(
            attempt=1, state="succeeded", error_code=None, response=row["status"],
            started_at=row["started_at"], duration_ms=row["duration_ms"], retry_at=None,
            actor=row["actor"], reason=None, batch=row["batch"]))
    return found
