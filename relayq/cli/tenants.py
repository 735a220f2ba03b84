"""relayq tenants create|list|get."""

from __future__ import annotations

import argparse
import sys

from relayq.cli import render
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    tenants = commands.add_parser("tenants", help="create and list tenants")
    sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="command")

    cmd = sub.add_parser("create", parents=[common], help="create a tenant")
    cmd.add_argument("tenant_id", metavar="ID",
                     help="lower-case letters, digits, '-' and '_', 1 to 63 characters")
    cmd.add_argument("--name", default="", help="a display name")
    cmd.set_defaults(run=admin_command(create))

    cmd = sub.add_parser("list", parents=[common], help="every tenant the token can see")
    cmd.set_defaults(run=admin_command(list_tenants))

    cmd = sub.add_parser("get", parents=[common], help="one tenant")
    cmd.add_argument("tenant_id", metavar="ID")
    cmd.set_defaults(run=admin_command(get))


def create(admin: Admin, args: argparse.Namespace) -> int:
    tenant = admin.call(admin.stub.CreateTenant,
                        admin_pb2.CreateTenantRequest(id=args.tenant_id, name=args.name))
    return show(tenant, args)


def get(admin: Admin, args: argparse.Namespace) -> int:
    return show(admin.call(admin.stub.GetTenant, admin_pb2.GetTenantRequest(id=args.tenant_id)),
                args)


def list_tenants(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.ListTenantsRequest()
    answer = admin.call(admin.stub.ListTenants, request)
    while answer.next_page_token:
        request.page_token = answer.next_page_token
        page = admin.call(admin.stub.ListTenants, request)
        answer.tenants.extend(page.tenants)
        answer.next_page_token = page.next_page_token
    if args.json:
        render.print_json(answer)
    elif not answer.tenants:
        print("no tenants", file=sys.stderr)
    else:
        render.table(["ID", "NAME", "CREATED"],
                     [[t.id, t.name or render.EMPTY, render.ago(t.created_at)]
                      for t in answer.tenants])
    return 0


def show(tenant: admin_pb2.Tenant, args: argparse.Namespace) -> int:
    if args.json:
        render.print_json(tenant)
    else:
        render.fields([("id", tenant.id), ("name", tenant.name or render.EMPTY),
                       ("created", render.when(tenant.created_at))])
    return 0
