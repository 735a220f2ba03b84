"""relayq sources create|list|get|update|rotate-key."""

from __future__ import annotations

import argparse
import sys

from relayq.cli import destinations, render, units
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2, common_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    sources = commands.add_parser("sources", help="create, list and re-key sources")
    sub = sources.add_subparsers(dest="sources_command", required=True, metavar="command")

    cmd = sub.add_parser("create", parents=[common],
                         help="create a source; prints its write key (shown only once)")
    cmd.add_argument("--tenant", required=True, help="the tenant that owns it")
    cmd.add_argument("--id", default="", dest="source_id", help="default: one is generated")
    cmd.add_argument("--name", default="", help="a display name")
    _rate_options(cmd)
    cmd.set_defaults(run=admin_command(create))

    cmd = sub.add_parser("update", parents=[common],
                         help="rename, disable or enable a source, or change its rate limit")
    cmd.add_argument("source_id", metavar="ID")
    cmd.add_argument("--name", help="a new display name")
    state = cmd.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="enabled", action="store_false", default=None,
                       help="ingest refuses its events (PERMISSION_DENIED)")
    state.add_argument("--enable", dest="enabled", action="store_true", default=None)
    _rate_options(cmd)
    cmd.set_defaults(run=admin_command(update))

    cmd = sub.add_parser("list", parents=[common], help="sources the token can see")
    cmd.add_argument("--tenant", default="", help="only this tenant's")
    cmd.set_defaults(run=admin_command(list_sources))

    cmd = sub.add_parser("get", parents=[common], help="one source")
    cmd.add_argument("source_id", metavar="ID")
    cmd.set_defaults(run=admin_command(get))

    cmd = sub.add_parser("rotate-key", parents=[common],
                         help="issue a new write key; the old one stops after --grace")
    cmd.add_argument("source_id", metavar="ID")
    cmd.add_argument("--grace", type=units.seconds, default=0, metavar="DURATION",
                     help="how long the old key keeps working, e.g. 10m (default: stops at once)")
    cmd.set_defaults(run=admin_command(rotate_key))


def _rate_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--rate", type=float, metavar="PER_SECOND",
                     help="events per second ingest takes from it, per ingest process"
                          " (0: unlimited)")
    cmd.add_argument("--burst", type=int, metavar="N",
                     help="token-bucket size for --rate (default: one second's worth)")


def _rate_limit(args: argparse.Namespace, base: common_pb2.RateLimit | None = None
                ) -> common_pb2.RateLimit | None:
    """The limit the options ask for, on top of `base` (the current one): --burst alone
    keeps the rate, --rate alone keeps the burst. None: the options say nothing."""
    if args.rate is None and args.burst is None:
        return None
    return destinations.rate_limit(base or common_pb2.RateLimit(), args)


def create(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.CreateSource, admin_pb2.CreateSourceRequest(
        id=args.source_id, tenant_id=args.tenant, name=args.name,
        rate_limit=_rate_limit(args)))
    return _show_with_key(answer, args)


def update(admin: Admin, args: argparse.Namespace) -> int:
    current = None
    if (args.rate is None) != (args.burst is None):  # one of them: keep the other as it is
        current = admin.call(admin.stub.GetSource,
                             admin_pb2.GetSourceRequest(id=args.source_id)).rate_limit
    request = admin_pb2.UpdateSourceRequest(id=args.source_id,
                                            rate_limit=_rate_limit(args, current))
    if args.name is not None:
        request.name = args.name
    if args.enabled is not None:
        request.enabled = args.enabled
    return _show(admin.call(admin.stub.UpdateSource, request), args)


def rotate_key(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.RotateWriteKey, admin_pb2.RotateWriteKeyRequest(
        source_id=args.source_id, grace_seconds=args.grace))
    return _show_with_key(answer, args)


def get(admin: Admin, args: argparse.Namespace) -> int:
    return _show(admin.call(admin.stub.GetSource, admin_pb2.GetSourceRequest(id=args.source_id)),
                 args)


def list_sources(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.ListSourcesRequest(tenant_id=args.tenant)
    answer = admin.call(admin.stub.ListSources, request)
    while answer.next_page_token:
        request.page_token = answer.next_page_token
        page = admin.call(admin.stub.ListSources, request)
        answer.sources.extend(page.sources)
        answer.next_page_token = page.next_page_token
    if args.json:
        render.print_json(answer)
    elif not answer.sources:
        print("no sources", file=sys.stderr)
    else:
        render.table(["ID", "TENANT", "NAME", "ENABLED", "RATE LIMIT", "CREATED"],
                     [[s.id, s.tenant_id, s.name or render.EMPTY, render.yes_no(s.enabled),
                       render.rate(s.rate_limit), render.ago(s.created_at)]
                      for s in answer.sources])
    return 0


def _show(source: admin_pb2.Source, args: argparse.Namespace) -> int:
    if args.json:
        render.print_json(source)
    else:
        render.fields(_fields(source))
    return 0


def _show_with_key(answer: admin_pb2.SourceWithKey, args: argparse.Namespace) -> int:
    if args.json:
        render.print_json(answer)
        return 0
    render.fields([*_fields(answer.source), ("write key", answer.write_key)])
    print("the write key is shown only now; send it to ingest as `authorization: Bearer <key>`",
          file=sys.stderr)
    return 0


def _fields(source: admin_pb2.Source) -> list[tuple[str, str]]:
    return [("id", source.id), ("tenant", source.tenant_id),
            ("name", source.name or render.EMPTY), ("enabled", render.yes_no(source.enabled)),
            ("rate limit", render.rate(source.rate_limit)),
            ("created", render.when(source.created_at))]
