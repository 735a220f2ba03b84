"""Jobs as operators steer them: list by filter, get with every attempt, peek, retry, abort.

Retry and abort count first: a dry run answers how many jobs the selector matches among those
the action applies to; otherwise the same statement changes them, recording who and why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from admin_service import convert, metrics, paging, validate
from admin_service.ops.base import Concern, changed
from filterlang.errors import FilterError
from jobsdb import catalog, standing, subscriptions
from jobsdb import errors as dberrors
from jobsdb import jobs as jobsdb
from jobsdb.filters import compile_filter
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.rpc import InvalidArgument
from relayq.v1 import admin_pb2, common_pb2

log = logging.getLogger("relayq.admin")

DEFAULT_PEEK = 20
# Runs of a job change that Postgres rolls back to break a deadlock, before giving up.
CONFLICT_ATTEMPTS = 4


class BadFilter(InvalidArgument):
    """A job filter the language rejects: INVALID_ARGUMENT, with the 1-based column the
    console marks under the filter."""

    def __init__(self, error: FilterError) -> None:
        super().__init__(f"filter: {error.message}", violations=[("filter", error.message)])
        self.position = error.position


def selection(text: str) -> jobsdb.Selection:
    """An operator's filter as a jobs selection; a malformed one is INVALID_ARGUMENT naming
    the position and what was expected."""
    try:
        compiled = compile_filter(text)
    except FilterError as exc:
        raise BadFilter(exc) from None
    if compiled is None:
        return jobsdb.EVERYTHING
    return jobsdb.Selection(compiled.where, compiled.params,
                            subscriptions.states(compiled.node))


class Jobs(Concern):
    async def list(self, caller: Caller, request: admin_pb2.ListJobsRequest
                   ) -> admin_pb2.ListJobsResponse:
        page = paging.read("jobs", request.page_size, request.page_token)
        after = page.after_id
        chosen = selection(request.filter)
        async with transaction(self._pool) as conn:
            found = await jobsdb.list_jobs(conn, chosen, caller.scope, after=after,
                                           limit=page.limit,
                                           include_payload=request.include_payload)
        # A page read from the log may stop short of page_size and still have a next one.
        more = found.more_after
        return admin_pb2.ListJobsResponse(
            jobs=[convert.job(r) for r in found.rows],
            next_page_token=paging.token("jobs", str(more)) if more is not None else "")

    async def get(self, caller: Caller, request: admin_pb2.GetJobRequest) -> common_pb2.Job:
        if request.job_id <= 0:
            raise validate.bad("job_id", "required (a positive job id)")
        async with transaction(self._pool) as conn:
            row, history = await standing.get_job(conn, request.job_id, caller.scope)
        return convert.job(row, history)

    async def peek(self, caller: Caller, request: admin_pb2.PeekJobsRequest
                   ) -> admin_pb2.PeekJobsResponse:
        destination_id = validate.reference("destination_id", request.destination_id)
        limit = validate.page_size("limit", request.limit, DEFAULT_PEEK)
        async with transaction(self._pool) as conn:
            destination = await catalog.get_destination(conn, destination_id, caller.scope)
            rows = await jobsdb.peek(conn, destination.destination_key, limit)
            now = await _now(conn)
        return admin_pb2.PeekJobsResponse(jobs=[
            _peeked(row, destination.paused, now) for row in rows])

    async def retry(self, caller: Caller, request: admin_pb2.RetryJobsRequest
                    ) -> admin_pb2.ChangeJobsResponse:
        return await self._change("retry", caller, request, "retried by an operator",
                                  functools.partial(jobsdb.retry, replay=request.replay))

    async def abort(self, caller: Caller, request: admin_pb2.AbortJobsRequest
                    ) -> admin_pb2.ChangeJobsResponse:
        return await self._change("abort", caller, request, "aborted by an operator",
                                  jobsdb.abort)

    async def _change(self, action: str, caller: Caller,
                      request: admin_pb2.RetryJobsRequest | admin_pb2.AbortJobsRequest,
                      default_reason: str, change: Callable[..., Awaitable[jobsdb.Change]]
                      ) -> admin_pb2.ChangeJobsResponse:
        """Count what the selector matches among the jobs the action applies to and, unless
        it is a dry run, change them in the same statement, saying who did it and why."""
        chosen = _selector(request.selector)
        reason = validate.reason(request.reason) or default_reason
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                async with transaction(self._pool) as conn:
                    done = await change(conn, chosen, caller.scope, actor=caller.actor,
                                        reason=reason, apply=not request.dry_run)
                break
            except dberrors.Conflict:
                # A router's flush locks a job after counting into the row this change also
                # counts into: Postgres breaks the cycle by rolling one back. Nothing of it
                # happened, and the compare-and-set makes running it again safe.
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("job change rolled back by a lock conflict; running it again",
                         extra={"attempt": attempt})
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
        if request.dry_run:
            return admin_pb2.ChangeJobsResponse(matched=done.matched, dry_run=True)
        metrics.JOB_CHANGES.labels(action).inc(done.changed)
        changed(caller, f"{action} jobs", count=done.changed, reason=reason)
        return admin_pb2.ChangeJobsResponse(matched=done.matched, changed=done.changed)


def _selector(request_selector: admin_pb2.JobSelector) -> jobsdb.Selection:
    ids, text = validate.selector(request_selector)
    return jobsdb.by_ids(ids) if ids else selection(text)


async def _now(conn: Any) -> datetime:
    cur = await conn.execute("SELECT now()")
    row = await cur.fetchone()
    return row[0]  # type: ignore[no-any-return]


def _peeked(row: jobsdb.PeekedRow, paused: bool, now: datetime) -> admin_pb2.PeekedJob:
    job = row.job
    reason = ""
    if row.holder is not None:
        reason = f"waiting behind job {row.holder}"
    elif job.state == "failed" and job.retry_at is not None and job.retry_at > now:
        reason = f"retry at {job.retry_at.isoformat()}"
    elif paused:
        reason = "destination paused"
    return admin_pb2.PeekedJob(job=convert.job(job), runnable=not reason,
                               blocked_by=row.holder or 0, blocked_reason=reason)
