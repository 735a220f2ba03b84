"""relayq events replay, relayq replays list|get|cancel: send a source's logged events to a
destination again, and follow or stop what is under way (backfills too)."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from relayq.cli import render
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2

# How often --watch asks for progress.
WATCH_SECONDS = 1.0


def add_replay_command(events: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`relayq events replay`, under the `events` command (relayq.cli.events)."""
    cmd = events.add_parser(
        "replay", parents=[options()],
        help="send a source's logged events to a destination again")
    cmd.add_argument("source_id", metavar="SOURCE")
    cmd.add_argument("destination_id", metavar="DESTINATION")
    cmd.add_argument("--from", dest="from_time", metavar="TIME",
                     help="events created at or after this RFC 3339 time")
    cmd.add_argument("--to", dest="to_time", metavar="TIME",
                     help="events created before this RFC 3339 time")
    cmd.add_argument("--from-event", type=int, default=0, metavar="ID",
                     help="events with this id or later")
    cmd.add_argument("--to-event", type=int, default=0, metavar="ID",
                     help="events with this id or earlier")
    cmd.add_argument("--from-oldest", action="store_true",
                     help="start from the oldest retained event when the range reaches before"
                          " it (otherwise refused)")
    cmd.add_argument("--filter", default="", metavar="FILTER",
                     help="only events matching this filter over type, event, user_id,"
                          " anonymous_id, properties.<path>, context.<path>")
    cmd.add_argument("--reason", default="", help="why (required unless --dry-run)")
    cmd.add_argument("--dry-run", action="store_true",
                     help="only count what would be sent; send nothing")
    cmd.add_argument("--watch", action="store_true",
                     help="follow the replay's progress until it is done")
    cmd.set_defaults(run=admin_command(replay))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    replays = commands.add_parser("replays", help="replays and backfills: list, follow, cancel")
    sub = replays.add_subparsers(dest="replays_command", required=True, metavar="command")
    cmd = sub.add_parser("list", parents=[common], help="replays and backfills, newest first")
    cmd.add_argument("--tenant", default="", help="only this tenant's")
    cmd.add_argument("--destination", default="", help="only to this destination")
    cmd.add_argument("--state", default="", choices=("", "running", "done", "cancelled"))
    cmd.set_defaults(run=admin_command(list_replays))
    cmd = sub.add_parser("get", parents=[common], help="one replay or backfill, its progress")
    cmd.add_argument("replay_id", metavar="REPLAY")
    cmd.add_argument("--watch", action="store_true", help="follow it until it is done")
    cmd.set_defaults(run=admin_command(get_replay))
    cmd = sub.add_parser("cancel", parents=[common],
                         help="stop it: no more rows, and its undelivered rows aborted")
    cmd.add_argument("replay_id", metavar="REPLAY")
    cmd.set_defaults(run=admin_command(cancel_replay))


def replay(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.ReplayEventsRequest(
        source_id=args.source_id, destination_id=args.destination_id,
        from_event_id=args.from_event, to_event_id=args.to_event, filter=args.filter,
        dry_run=args.dry_run, reason=args.reason, from_oldest=args.from_oldest)
    for field, value in (("from_time", args.from_time), ("to_time", args.to_time)):
        if value:
            getattr(request, field).CopyFrom(_timestamp(value, field))
    answer = admin.call(admin.stub.ReplayEvents, request)
    if args.json and not args.watch:
        render.print_json(answer)
        return 0
    if answer.dry_run:
        print(f"dry run: would send {answer.matched} events again; nothing changed")
        return 0
    print(f"replay {answer.replay.replay_id} started: {answer.matched} events")
    return _watch(admin, answer.replay, args) if args.watch else 0


def list_replays(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.ListReplays, admin_pb2.ListReplaysRequest(
        tenant_id=args.tenant, destination_id=args.destination, state=args.state))
    if args.json:
        render.print_json(answer)
    elif not answer.replays:
        print("no replays", file=sys.stderr)
    else:
        render.table(["REPLAY", "KIND", "SOURCE", "DESTINATION", "STATE", "PROGRESS", "CREATED",
                      "REASON"],
                     [[r.replay_id, r.kind, r.source_id, r.destination_id, r.state,
                       _progress(r), render.ago(r.created_at), render.compact(r.reason, 40)]
                      for r in answer.replays])
    return 0


def get_replay(admin: Admin, args: argparse.Namespace) -> int:
    found = admin.call(admin.stub.GetReplay, admin_pb2.GetReplayRequest(
        replay_id=args.replay_id))
    if args.watch:
        return _watch(admin, found, args)
    _show(found, args)
    return 0


def cancel_replay(admin: Admin, args: argparse.Namespace) -> int:
    _show(admin.call(admin.stub.CancelReplay, admin_pb2.CancelReplayRequest(
        replay_id=args.replay_id)), args)
    return 0


def _watch(admin: Admin, found: admin_pb2.Replay, args: argparse.Namespace) -> int:
    """Print progress until every row is written and delivered (or it is cancelled)."""
    while True:
        print(f"{found.replay_id}: {found.state}, {_progress(found)}", flush=True)
        if found.state == "cancelled" or (found.state == "done" and not found.pending):
            _show(found, args)
            return 0
        time.sleep(WATCH_SECONDS)
        found = admin.call(admin.stub.GetReplay, admin_pb2.GetReplayRequest(
            replay_id=found.replay_id))


def _progress(r: admin_pb2.Replay) -> str:
    shown = f"{r.delivered}/{r.matched} delivered"
    if r.pending:
        shown += f", {r.pending} to go"
    if r.aborted:
        shown += f", {r.aborted} aborted"
    return shown


def _show(r: admin_pb2.Replay, args: argparse.Namespace) -> None:
    if args.json:
        render.print_json(r)
        return
    render.fields([
        ("replay", r.replay_id), ("kind", r.kind), ("tenant", r.tenant_id),
        ("source", r.source_id), ("destination", r.destination_id), ("state", r.state),
        ("events", f"ids {r.first_event_id}..{r.last_event_id}"),
        ("from", render.when(r.from_time)), ("to", render.when(r.to_time)),
        ("filter", r.filter or "every event"), ("progress", _progress(r)),
        ("written", str(r.written)), ("by", r.actor), ("reason", r.reason),
        ("created", render.when(r.created_at)), ("finished", render.when(r.finished_at)),
        *((("cancelled by", r.cancelled_by),) if r.cancelled_by else ()),
    ])


def _timestamp(value: str, flag: str) -> Timestamp:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"relayq: --{flag.removesuffix('_time')}: not an RFC 3339 time"
                         f" (2026-12-01T00:00:00Z): {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp
