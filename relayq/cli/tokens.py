"""relayq tokens create|list|revoke: tenant-scoped admin tokens."""

from __future__ import annotations

import argparse
import sys

from relayq.cli import render
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    tokens = commands.add_parser("tokens", help="tenant-scoped admin tokens")
    sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="command")

    cmd = sub.add_parser("create", parents=[common],
                         help="a token that sees and changes only one tenant (operator only)")
    cmd.add_argument("--tenant", required=True, help="the only tenant the token may use")
    cmd.add_argument("--name", default="", help="what the token is for")
    cmd.set_defaults(run=admin_command(create))

    cmd = sub.add_parser("list", parents=[common],
                         help="tokens the caller can see, revoked ones included")
    cmd.add_argument("--tenant", default="", help="only this tenant's")
    cmd.set_defaults(run=admin_command(list_tokens))

    cmd = sub.add_parser("revoke", parents=[common],
                         help="stop a token working, at once (operator only)")
    cmd.add_argument("token_id", metavar="ID", help="the token's id, not its secret")
    cmd.set_defaults(run=admin_command(revoke))


def create(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.CreateAdminToken,
                        admin_pb2.CreateAdminTokenRequest(tenant_id=args.tenant, name=args.name))
    if args.json:
        render.print_json(answer)
        return 0
    render.fields([*_fields(answer.token), ("secret", answer.secret)])
    print("the secret is shown only now; keep it somewhere safe", file=sys.stderr)
    return 0


def list_tokens(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.ListAdminTokens,
                        admin_pb2.ListAdminTokensRequest(tenant_id=args.tenant))
    if args.json:
        render.print_json(answer)
    elif not answer.tokens:
        print("no admin tokens", file=sys.stderr)
    else:
        render.table(["ID", "TENANT", "NAME", "CREATED", "REVOKED"],
                     [[t.id, t.tenant_id, t.name or render.EMPTY, render.ago(t.created_at),
                       render.ago(t.revoked_at)]
                      for t in answer.tokens])
    return 0


def revoke(admin: Admin, args: argparse.Namespace) -> int:
    token = admin.call(admin.stub.RevokeAdminToken,
                       admin_pb2.RevokeAdminTokenRequest(id=args.token_id))
    if args.json:
        render.print_json(token)
    else:
        render.fields(_fields(token))
    return 0


def _fields(token: admin_pb2.AdminToken) -> list[tuple[str, str]]:
    shown = [("id", token.id), ("tenant", token.tenant_id),
             ("name", token.name or render.EMPTY), ("created", render.when(token.created_at))]
    if token.HasField("revoked_at"):
        shown.append(("revoked", render.when(token.revoked_at)))
    return shown
