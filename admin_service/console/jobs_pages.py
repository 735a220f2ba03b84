"""Jobs: the browser driven by the filter language, a job with every attempt, peek, and
retry or abort (a dry run's count first, then a reason, then the change)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from google.protobuf import json_format

from admin_service.console.web import console, render, see_other, session
from admin_service.ops.jobs import BadFilter
from relayq.v1 import admin_pb2, common_pb2

PAGE = 50
FINISHED = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_ABORTED)
ACTIONS = {"retry": "Retry", "abort": "Abort"}


def state_name(state: common_pb2.JobState.ValueType) -> str:
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()


async def browse(request: web.Request) -> web.Response:
    text = request.query.get("filter", "")
    token = request.query.get("page_token", "")
    try:
        found = await console(request).ops.jobs.list(session(request).caller,
                                                     admin_pb2.ListJobsRequest(
                                                         filter=text, page_size=PAGE,
                                                         page_token=token))
    except BadFilter as exc:
        return render(request, "jobs.html", status=400, filter=text, jobs=[], next_link="",
                      bad=bad_filter(text, exc), state_name=state_name, encode=urlencode,
                      done="")
    next_link = ("?" + urlencode({"filter": text, "page_token": found.next_page_token})
                 if found.next_page_token else "")
    return render(request, "jobs.html", filter=text, jobs=found.jobs, next_link=next_link,
                  bad=None, state_name=state_name, encode=urlencode,
                  done=request.query.get("done", ""))


def bad_filter(text: str, exc: BadFilter) -> dict[str, Any]:
    """The filter split around the column the error names, to mark it where it is."""
    at = max(0, min(exc.position - 1, len(text)))
    return {"message": exc.message.removeprefix("filter: "), "column": exc.position,
            "before": text[:at], "at": text[at:at + 1] or " ", "after": text[at + 1:]}


async def job(request: web.Request) -> web.Response:
    return render(request, "job.html", **await _job(request))


async def job_live(request: web.Request) -> web.Response:
    """The job's state and attempts alone, reloaded every few seconds while it is unfinished."""
    return render(request, "job_live.html", **await _job(request))


async def _job(request: web.Request) -> dict[str, Any]:
    job_id = _job_id(request.match_info["job_id"])
    found = await console(request).ops.jobs.get(session(request).caller,
                                                admin_pb2.GetJobRequest(job_id=job_id))
    payload = (json.dumps(json_format.MessageToDict(found.payload), indent=2, sort_keys=True)
               if found.HasField("payload") else "")
    return {"job": found, "payload": payload, "state_name": state_name,
            "finished": found.state in FINISHED, "done": request.query.get("done", ""),
            "encode": urlencode}


async def peek(request: web.Request) -> web.Response:
    destination_id = request.match_info["destination_id"]
    found = await console(request).ops.jobs.peek(session(request).caller,
                                                 admin_pb2.PeekJobsRequest(
                                                     destination_id=destination_id, limit=100))
    # Each user held back, with the job holding them: one click from the page to the cause.
    stuck: OrderedDict[str, tuple[int, int]] = OrderedDict()
    for peeked in found.jobs:
        if peeked.blocked_by:
            held, blocker = stuck.get(peeked.job.user_id, (0, peeked.blocked_by))
            stuck[peeked.job.user_id] = (held + 1, blocker)
    return render(request, "peek.html", destination_id=destination_id, jobs=found.jobs,
                  stuck=stuck, state_name=state_name, encode=urlencode)


async def confirm(request: web.Request) -> web.Response:
    """A dry run of retry or abort: how many jobs it would change, and the form to do it."""
    action = _action(request)
    selector = _selector(request.query)
    counted = await _change(request, action, selector, dry_run=True, reason="")
    return render(request, "change.html", action=action, verb=ACTIONS[action],
                  selector=selector, matched=counted.matched, error="",
                  job_id=selector.job_ids[0] if selector.job_ids else 0)


async def apply(request: web.Request) -> web.StreamResponse:
    action = _action(request)
    posted = await request.post()
    selector = _selector(posted)
    reason = str(posted.get("reason", "")).strip()
    if not reason:
        counted = await _change(request, action, selector, dry_run=True, reason="")
        return render(request, "change.html", status=400, action=action, verb=ACTIONS[action],
                      selector=selector, matched=counted.matched,
                      error="say why: the reason is kept with every job changed",
                      job_id=selector.job_ids[0] if selector.job_ids else 0)
    done = await _change(request, action, selector, dry_run=False, reason=reason)
    console(request).stats.invalidate()
    summary = f"{ACTIONS[action].lower()}: {done.changed} of {done.matched} matched jobs changed"
    if selector.job_ids:
        raise see_other(f"/jobs/{selector.job_ids[0]}?" + urlencode({"done": summary}))
    raise see_other("/jobs?" + urlencode({"filter": selector.filter, "done": summary}))


async def _change(request: web.Request, action: str, selector: admin_pb2.JobSelector, *,
                  dry_run: bool, reason: str) -> admin_pb2.ChangeJobsResponse:
    ops, caller = console(request).ops, session(request).caller
    if action == "retry":
        return await ops.jobs.retry(caller, admin_pb2.RetryJobsRequest(
            selector=selector, dry_run=dry_run, reason=reason))
    return await ops.jobs.abort(caller, admin_pb2.AbortJobsRequest(
        selector=selector, dry_run=dry_run, reason=reason))


def _action(request: web.Request) -> str:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise web.HTTPNotFound()
    return action


def _selector(fields: Mapping[str, object]) -> admin_pb2.JobSelector:
    """Jobs by id (a job page's buttons) or by filter (the browser's); the service layer
    checks which, and says what is missing."""
    job_id = str(fields.get("job_id", "")).strip()
    if job_id:
        return admin_pb2.JobSelector(job_ids=[_job_id(job_id)])
    return admin_pb2.JobSelector(filter=str(fields.get("filter", "")))


def _job_id(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2**63:
        raise web.HTTPNotFound()
    return int(text)
