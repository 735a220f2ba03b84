"""relayq connections connect|update|disconnect|list: which sources feed which destinations,
and which of a source's events each destination takes (its connection's filter)."""

from __future__ import annotations

import argparse
import sys

from relayq.cli import render
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    connections = commands.add_parser("connections",
                                      help="connect sources to destinations")
    sub = connections.add_subparsers(dest="connections_command", required=True,
                                     metavar="command")
    for name, run, what in (
            ("connect", connect, "send a source's events to a destination from now on"),
            ("update", update, "change which of a source's events a destination takes"),
            ("disconnect", disconnect, "stop sending a source's events to a destination")):
        cmd = sub.add_parser(name, parents=[common], help=what)
        cmd.add_argument("source_id", metavar="SOURCE")
        cmd.add_argument("destination_id", metavar="DESTINATION")
        if name == "connect":
            cmd.add_argument("--filter", default=None, metavar="FILTER", help=_FILTER_HELP
                             + " Without it, a new connection takes every event and an"
                             " existing one keeps its filter.")
            cmd.add_argument("--backfill-from", default="", metavar="WHEN",
                             help="first send the source's retained events from then on:"
                                  " 'earliest', an RFC 3339 time, or a duration such as 7d"
                                  " (follow it with relayq replays get)")
        elif name == "update":
            cmd.add_argument("--filter", required=True, metavar="FILTER",
                             help=_FILTER_HELP + " '' takes every event.")
        cmd.set_defaults(run=admin_command(run))

    cmd = sub.add_parser("list", parents=[common], help="connections the token can see")
    cmd.add_argument("--tenant", default="", help="only this tenant's")
    cmd.add_argument("--source", default="", help="only from this source")
    cmd.add_argument("--destination", default="", help="only to this destination")
    cmd.set_defaults(run=admin_command(list_connections))


_FILTER_HELP = ("only events matching this filter, over type, event, user_id, anonymous_id,"
                " properties.<path> and context.<path>, e.g. \"event = 'Order Completed' AND"
                " properties.revenue >= 100\".")


def connect(admin: Admin, args: argparse.Namespace) -> int:
    return _show(admin.call(admin.stub.ConnectSource, admin_pb2.ConnectSourceRequest(
        source_id=args.source_id, destination_id=args.destination_id, filter=args.filter,
        backfill_from=args.backfill_from)), args)


def update(admin: Admin, args: argparse.Namespace) -> int:
    return _show(admin.call(admin.stub.UpdateConnection, admin_pb2.UpdateConnectionRequest(
        source_id=args.source_id, destination_id=args.destination_id, filter=args.filter)),
        args)


def disconnect(admin: Admin, args: argparse.Namespace) -> int:
    return _show(admin.call(admin.stub.DisconnectSource, admin_pb2.DisconnectSourceRequest(
        source_id=args.source_id, destination_id=args.destination_id)), args)


def list_connections(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.ListConnections, admin_pb2.ListConnectionsRequest(
        tenant_id=args.tenant, source_id=args.source, destination_id=args.destination))
    if args.json:
        render.print_json(answer)
    elif not answer.connections:
        print("no connections", file=sys.stderr)
    else:
        render.table(["SOURCE", "DESTINATION", "ENABLED", "CREATED", "FILTER"],
                     [[c.source_id, c.destination_id, render.yes_no(c.enabled),
                       render.ago(c.created_at), _filter(c)] for c in answer.connections])
    return 0


def _show(connection: admin_pb2.Connection, args: argparse.Namespace) -> int:
    if args.json:
        render.print_json(connection)
    else:
        state = "connected" if connection.enabled else "disconnected"
        shown = f", filter: {connection.filter}" if connection.filter else ""
        print(f"{connection.source_id} -> {connection.destination_id}: {state}{shown}")
        if connection.backfill_id:
            print(f"backfill {connection.backfill_id} started"
                  f" (relayq replays get {connection.backfill_id} --watch)")
    return 0


def _filter(connection: admin_pb2.Connection) -> str:
    return connection.filter or "every event"
