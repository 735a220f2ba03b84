"""relayq connections connect|disconnect|list: which sources feed which destinations."""

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
            ("disconnect", disconnect, "stop sending a source's events to a destination")):
        cmd = sub.add_parser(name, parents=[common], help=what)
        cmd.add_argument("source_id", metavar="SOURCE")
        cmd.add_argument("destination_id", metavar="DESTINATION")
        cmd.set_defaults(run=admin_command(run))

    cmd = sub.add_parser("list", parents=[common], help="connections the token can see")
    cmd.add_argument("--tenant", default="", help="only this tenant's")
    cmd.add_argument("--source", default="", help="only from this source")
    cmd.add_argument("--destination", default="", help="only to this destination")
    cmd.set_defaults(run=admin_command(list_connections))


def connect(admin: Admin, args: argparse.Namespace) -> int:
    return _show(admin.call(admin.stub.ConnectSource, admin_pb2.ConnectSourceRequest(
        source_id=args.source_id, destination_id=args.destination_id)), args)


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
        render.table(["SOURCE", "DESTINATION", "ENABLED", "CREATED"],
                     [[c.source_id, c.destination_id, render.yes_no(c.enabled),
                       render.ago(c.created_at)] for c in answer.connections])
    return 0


def _show(connection: admin_pb2.Connection, args: argparse.Namespace) -> int:
    if args.json:
        render.print_json(connection)
    else:
        state = "connected" if connection.enabled else "disconnected"
        print(f"{connection.source_id} -> {connection.destination_id}: {state}")
    return 0
