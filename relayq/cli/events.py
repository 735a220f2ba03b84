"""relayq events list|get|replay: find events in the log, where each stands at its
destinations, and send them again (replay: relayq.cli.replays).

`register` builds the `events` group and hands its subparsers to every function in
`COMMANDS`; a new subcommand is one more function there, in its own module if it likes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeAlias

from relayq.cli import render, replays
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(commands: Subparsers) -> None:
    common = options()
    group = commands.add_parser("events", help="find events in the log and where they stand")
    sub = group.add_subparsers(dest="events_command", required=True, metavar="command")
    for add in COMMANDS:
        add(sub, common)


def add_list(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "list", parents=[common], help="a source's events matching a filter, in log order",
        description="A source's events matching a filter, in log order. Filter example: "
                    "user_id = 'u1' AND payload.event = 'Order Completed' "
                    "AND created_at > '2026-11-01'")
    cmd.add_argument("source", metavar="SOURCE")
    cmd.add_argument("--filter", default="", help="the filter expression (default: every event)")
    cmd.add_argument("--limit", type=int, default=0, metavar="N",
                     help="events per page, 1 to 1000 (default: the server's, 100)")
    cmd.add_argument("--page-token", default="", help="continue where a previous page ended")
    cmd.add_argument("--all", action="store_true", help="follow every page to the end")
    cmd.add_argument("--payload", action="store_true", help="include each event's payload")
    cmd.set_defaults(run=admin_command(list_events))


def add_get(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    cmd = sub.add_parser(
        "get", parents=[common],
        help="one event and where it stands at each destination of its source",
        description="One event, by id or by --source and --message-id, and where it stands at "
                    "each destination: pending, delivered, failed, waiting, aborted, filtered "
                    "out, or not connected at the time.")
    cmd.add_argument("event_id", type=int, nargs="?", default=0, metavar="EVENT_ID")
    cmd.add_argument("--source", default="", help="the source of --message-id")
    cmd.add_argument("--message-id", default="", help="the event's message id")
    cmd.set_defaults(run=admin_command(get_event))


def add_replay(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    replays.add_replay_command(sub)


# The `events` subcommands, in help order.
COMMANDS: list[Callable[[Subparsers, argparse.ArgumentParser], None]] = [
    add_list, add_get, add_replay]


def list_events(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.ListEventsRequest(source_id=args.source, filter=args.filter,
                                          page_size=args.limit, page_token=args.page_token,
                                          include_payload=args.payload)
    answer = admin.call(admin.stub.ListEvents, request)
    while args.all and answer.next_page_token:
        request.page_token = answer.next_page_token
        page = admin.call(admin.stub.ListEvents, request)
        answer.events.extend(page.events)
        answer.next_page_token = page.next_page_token
    if args.json:
        render.print_json(answer)
        return 0
    if not answer.events:
        print("no events match", file=sys.stderr)
    else:
        headers = ["EVENT", "USER", "MESSAGE", "CREATED", "DESTINATIONS"]
        if args.payload:
            headers.append("PAYLOAD")
        rows = []
        for e in answer.events:
            row = [str(e.event_id), e.user_id or render.EMPTY, e.message_id,
                   render.ago(e.created_at), ",".join(e.destination_ids) or "(all)"]
            if args.payload:
                row.append(render.compact(render.struct_json(e.payload)))
            rows.append(row)
        render.table(headers, rows)
    if answer.next_page_token:
        print(f"more events: --page-token {answer.next_page_token} (or --all)", file=sys.stderr)
    return 0


_STATUS = {
    admin_pb2.EVENT_STATUS_PENDING: "pending",
    admin_pb2.EVENT_STATUS_DELIVERED: "delivered",
    admin_pb2.EVENT_STATUS_FAILED: "failed",
    admin_pb2.EVENT_STATUS_WAITING: "waiting",
    admin_pb2.EVENT_STATUS_ABORTED: "aborted",
    admin_pb2.EVENT_STATUS_FILTERED_OUT: "filtered out",
    admin_pb2.EVENT_STATUS_NOT_CONNECTED: "not connected",
}


def get_event(admin: Admin, args: argparse.Namespace) -> int:
    if bool(args.event_id) == bool(args.source or args.message_id):
        print("relayq: events get: give EVENT_ID, or --source and --message-id (one of them)",
              file=sys.stderr)
        return 2
    answer = admin.call(admin.stub.GetEvent, admin_pb2.GetEventRequest(
        event_id=args.event_id, source_id=args.source, message_id=args.message_id))
    if args.json:
        render.print_json(answer)
        return 0
    e = answer.event
    render.fields([
        ("event", str(e.event_id)),
        ("tenant", e.tenant_id),
        ("source", e.source_id),
        ("user", e.user_id or render.EMPTY),
        ("message id", e.message_id),
        ("created", render.when(e.created_at)),
        ("destinations named", ",".join(e.destination_ids) or "(none: every connection)"),
    ])
    print("\npayload:")
    print(render.pretty(render.struct_json(e.payload)) if e.HasField("payload") else "  -")
    print("\ndestinations:")
    if not answer.destinations:
        print("  (the source has no connections)")
        return 0
    render.table(["DESTINATION", "STATUS", "JOB", "ATTEMPTS", "LAST", "DETAIL"],
                 [[d.destination_id, _STATUS.get(d.status, "?"),
                   str(d.job.job_id) if d.HasField("job") else render.EMPTY,
                   str(d.job.attempts) if d.HasField("job") else render.EMPTY,
                   _last(d), _detail(d)] for d in answer.destinations])
    return 0


def _last(d: admin_pb2.EventAtDestination) -> str:
    if not d.HasField("job") or not d.job.history:
        return render.EMPTY
    return render.ago(d.job.history[-1].started_at)


def _detail(d: admin_pb2.EventAtDestination) -> str:
    if d.status == admin_pb2.EVENT_STATUS_WAITING:
        return f"behind event {d.waiting_behind_event_id} (job {d.waiting_behind_job_id})"
    if d.reason:
        return render.compact(d.reason, 60)
    if d.HasField("job") and d.job.history:
        last = d.job.history[-1]
        answer = last.error_code or last.response or render.EMPTY
        batch = f" batch {last.batch_id}" if last.batch_id else ""
        return render.compact(f"answered {answer}{batch}", 60)
    return render.EMPTY
