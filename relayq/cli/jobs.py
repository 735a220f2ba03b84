"""relayq jobs list|get|peek|retry|abort: query and steer jobs through relayq-admin."""

from __future__ import annotations

import argparse
import sys

from relayq.cli import render
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2, common_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    jobs = commands.add_parser("jobs", help="list, inspect, peek, retry and abort jobs")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="command")

    cmd = sub.add_parser(
        "list", parents=[common], help="jobs matching a filter, in job order",
        description="Jobs matching a filter, in job order. Filter example: "
                    "destination = 'd1' AND state IN ('failed','waiting') AND attempts >= 3")
    cmd.add_argument("--filter", default="", help="the filter expression (default: every job)")
    cmd.add_argument("--page-size", type=int, default=0, metavar="N",
                     help="jobs per page, 1 to 1000 (default: the server's, 100)")
    cmd.add_argument("--page-token", default="", help="continue where a previous page ended")
    cmd.add_argument("--all", action="store_true", help="follow every page to the end")
    cmd.add_argument("--payload", action="store_true", help="include each job's payload")
    cmd.set_defaults(run=admin_command(list_jobs))

    cmd = sub.add_parser("get", parents=[common], help="one job, its payload and every attempt")
    cmd.add_argument("job_id", type=int, metavar="ID")
    cmd.set_defaults(run=admin_command(get_job))

    cmd = sub.add_parser("peek", parents=[common],
                         help="what the router will deliver next for a destination")
    cmd.add_argument("destination", metavar="DESTINATION")
    cmd.add_argument("--limit", type=int, default=0, metavar="N",
                     help="how many jobs, 1 to 1000 (default: the server's, 20)")
    cmd.set_defaults(run=admin_command(peek_jobs))

    for name, run, what in (("retry", retry_jobs, "retry now (failed, waiting or aborted jobs)"),
                            ("abort", abort_jobs, "give up on jobs, releasing their barrier")):
        cmd = sub.add_parser(name, parents=[common], help=what,
                             description=f"{what[0].upper()}{what[1:]}, by ids or by filter.")
        cmd.add_argument("job_ids", type=int, nargs="*", metavar="ID")
        cmd.add_argument("--filter", default="", help="select jobs by filter instead of ids")
        cmd.add_argument("--dry-run", action="store_true",
                         help="count the jobs it would change; change nothing")
        cmd.add_argument("--reason", default="", help="recorded in each job's history")
        if name == "retry":
            cmd.add_argument("--replay", action="store_true",
                             help="deliver selected succeeded jobs again too")
        cmd.set_defaults(run=admin_command(run))


def list_jobs(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.ListJobsRequest(filter=args.filter, page_size=args.page_size,
                                        page_token=args.page_token,
                                        include_payload=args.payload)
    answer = admin.call(admin.stub.ListJobs, request)
    while args.all and answer.next_page_token:
        request.page_token = answer.next_page_token
        page = admin.call(admin.stub.ListJobs, request)
        answer.jobs.extend(page.jobs)
        answer.next_page_token = page.next_page_token
    if args.json:
        render.print_json(answer)
        return 0
    if not answer.jobs:
        print("no jobs match", file=sys.stderr)
        return 0
    headers = ["JOB", "STATE", "ATTEMPTS", "TENANT", "DESTINATION", "USER", "MESSAGE",
               "ERROR", "CREATED", "NEXT"]
    if args.payload:
        headers.append("PAYLOAD")
    rows = []
    for job in answer.jobs:
        row = [str(job.job_id), render.state(job.state), str(job.attempts), job.tenant_id,
               job.destination_id, job.user_id or render.EMPTY, job.message_id,
               job.error_code or render.EMPTY, render.ago(job.created_at), _next(job)]
        if args.payload:
            row.append(render.compact(render.struct_json(job.payload)))
        rows.append(row)
    render.table(headers, rows)
    if answer.next_page_token:
        print(f"more jobs: --page-token {answer.next_page_token} (or --all)", file=sys.stderr)
    return 0


def get_job(admin: Admin, args: argparse.Namespace) -> int:
    job = admin.call(admin.stub.GetJob, admin_pb2.GetJobRequest(job_id=args.job_id))
    if args.json:
        render.print_json(job)
        return 0
    render.fields([
        ("job", str(job.job_id)),
        ("state", render.state(job.state)),
        ("tenant", job.tenant_id),
        ("source", job.source_id),
        ("destination", job.destination_id),
        ("user", job.user_id or render.EMPTY),
        ("message id", job.message_id),
        ("traceparent", job.traceparent or render.EMPTY),
        ("attempts", str(job.attempts)),
        ("error", job.error_code or render.EMPTY),
        ("blocked by", str(job.blocked_by) if job.blocked_by else render.EMPTY),
        ("retry at", render.when(job.retry_at)),
        ("created", render.when(job.created_at)),
        ("first attempt", render.when(job.first_attempt_at)),
        ("updated", render.when(job.updated_at)),
    ])
    print("\npayload:")
    print(render.pretty(render.struct_json(job.payload)) if job.HasField("payload") else "  -")
    print("\nhistory:")
    if not job.history:
        print("  (no attempts yet)")
        return 0
    render.table(
        ["ATTEMPT", "STATE", "ERROR", "STARTED", "DURATION", "RETRY AT", "ACTOR", "REASON",
         "RESPONSE"],
        [[str(h.attempt), render.state(h.state), h.error_code or render.EMPTY,
          render.ago(h.started_at), f"{h.duration_ms}ms" if h.duration_ms else render.EMPTY,
          render.ago(h.retry_at), h.actor or render.EMPTY, render.compact(h.reason or "-", 40),
          render.compact(h.response or "-")]
         for h in job.history],
    )
    return 0


def peek_jobs(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.PeekJobs, admin_pb2.PeekJobsRequest(
        destination_id=args.destination, limit=args.limit))
    if args.json:
        render.print_json(answer)
        return 0
    if not answer.jobs:
        print(f"nothing to deliver for {args.destination}", file=sys.stderr)
        return 0
    render.table(
        ["#", "JOB", "STATE", "ATTEMPTS", "USER", "RUNNABLE", "WHY NOT"],
        [[str(i), str(p.job.job_id), render.state(p.job.state), str(p.job.attempts),
          p.job.user_id or render.EMPTY, render.yes_no(p.runnable), _why_not(p)]
         for i, p in enumerate(answer.jobs, 1)],
    )
    return 0


def retry_jobs(admin: Admin, args: argparse.Namespace) -> int:
    selector = _selector(args)
    if selector is None:
        return 2
    answer = admin.call(admin.stub.RetryJobs, admin_pb2.RetryJobsRequest(
        selector=selector, dry_run=args.dry_run, reason=args.reason, replay=args.replay))
    return _report_change(answer, args, "retry", "retried")


def abort_jobs(admin: Admin, args: argparse.Namespace) -> int:
    selector = _selector(args)
    if selector is None:
        return 2
    answer = admin.call(admin.stub.AbortJobs, admin_pb2.AbortJobsRequest(
        selector=selector, dry_run=args.dry_run, reason=args.reason))
    return _report_change(answer, args, "abort", "aborted")


def _selector(args: argparse.Namespace) -> admin_pb2.JobSelector | None:
    """Ids or a filter, exactly one: a bulk change must never select more than was meant."""
    if bool(args.job_ids) == bool(args.filter):
        print(f"relayq: jobs {args.jobs_command}: give job ids or --filter (one of them)",
              file=sys.stderr)
        return None
    return admin_pb2.JobSelector(job_ids=args.job_ids, filter=args.filter)


def _report_change(answer: admin_pb2.ChangeJobsResponse, args: argparse.Namespace,
                   verb: str, done: str) -> int:
    if args.json:
        render.print_json(answer)
        return 0
    noun = "job" if answer.matched == 1 else "jobs"
    if answer.dry_run:
        print(f"dry run: would {verb} {answer.matched} {noun}; nothing changed")
    elif answer.changed == answer.matched:
        print(f"{done} {answer.changed} {noun}")
    else:
        # Routers keep running: some matched jobs may have moved on before the change.
        print(f"{done} {answer.changed} of {answer.matched} matching {noun}"
              " (the rest changed state meanwhile)")
    if args.job_ids and answer.matched < len(args.job_ids):
        skipped = len(args.job_ids) - answer.matched
        print(f"{skipped} of the given ids do not exist or are not in a state to {verb}",
              file=sys.stderr)
    return 0


def _next(job: common_pb2.Job) -> str:
    if job.state == common_pb2.JOB_STATE_FAILED and job.HasField("retry_at"):
        return f"retry {render.ago(job.retry_at)}"
    if job.state == common_pb2.JOB_STATE_WAITING and job.blocked_by:
        return f"after job {job.blocked_by}"
    return render.EMPTY


def _why_not(peeked: admin_pb2.PeekedJob) -> str:
    if peeked.runnable:
        return render.EMPTY
    if peeked.blocked_reason:
        return peeked.blocked_reason
    if peeked.blocked_by:
        return f"waiting behind job {peeked.blocked_by}"
    return render.EMPTY
