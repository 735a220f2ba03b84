"""Talking to relayq-admin: where it is, which token, TLS, and what a failed call prints.

Every admin subcommand takes the same connection options (via `options()`, an argparse parent)
and is wrapped by `admin_command`, so the command body only builds a request and prints the
answer. A gRPC error never escapes as a traceback: it becomes one line on stderr,
`relayq: <CODE>: <details>`, plus the server's field violations, and exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from relayq.config import ConfigError, Env
from relayq.v1 import admin_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50052"
DEFAULT_DEADLINE_SECONDS = 60.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Admin:
    """A connected admin stub that sends the token and a deadline with every call."""

    def __init__(self, channel: grpc.Channel, token: str | None, deadline: float) -> None:
        self.stub = admin_pb2_grpc.AdminStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._deadline = deadline

    def call(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        return method(request, metadata=self._metadata, timeout=self._deadline)


Command = Callable[[Admin, argparse.Namespace], int]


def options() -> argparse.ArgumentParser:
    """The options every admin subcommand accepts, wherever they appear on the line."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection and output")
    group.add_argument("--admin", metavar="HOST:PORT",
                       help="relayq-admin address"
                            f" (RELAYQ_ADMIN_ADDRESS; default {DEFAULT_ADDRESS})")
    group.add_argument("--token",
                       help="admin token (RELAYQ_ADMIN_TOKEN; the variable keeps it out of"
                            " shell history and ps)")
    group.add_argument("--ca-file", metavar="PEM",
                       help="CA certificate to verify the server; turns on TLS"
                            " (RELAYQ_ADMIN_CA_FILE)")
    group.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_SECONDS,
                       metavar="SECONDS",
                       help="give up on a call after this long"
                            f" (default {DEFAULT_DEADLINE_SECONDS:g})")
    group.add_argument("--json", action="store_true",
                       help="print the answer as one JSON document (protobuf JSON mapping)")
    return parent


def admin_command(body: Command) -> Callable[[argparse.Namespace], int]:
    """Turn a command body into `args.run`: connect, call, close, and report gRPC errors."""

    @functools.wraps(body)
    def run(args: argparse.Namespace) -> int:
        env = Env()
        address = _address(args.admin, env)
        token = args.token or env.text("RELAYQ_ADMIN_TOKEN", "") or None
        ca_file = _ca_file(args.ca_file, env)
        with _channel(address, ca_file) as channel:
            try:
                return body(Admin(channel, token, args.deadline), args)
            except grpc.RpcError as exc:
                print(describe(exc, address=address, had_token=token is not None),
                      file=sys.stderr)
                return 1

    return run


def describe(error: grpc.RpcError, *, address: str, had_token: bool) -> str:
    """`relayq: CODE: details`, then one indented line per BadRequest field violation."""
    if not isinstance(error, grpc.Call):
        return f"relayq: {error}"
    code = error.code()
    lines = [f"relayq: {code.name}: {error.details() or '(no details)'}"]
    status = _rich_status(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                lines.extend(f"  {v.field}: {v.description}" for v in bad.field_violations
                             # A lone violation often repeats the message word for word.
                             if f"{v.field}: {v.description}" != error.details())
    # The server always attaches a status trailer; its absence means we never reached it.
    if code == grpc.StatusCode.UNAVAILABLE and status is None:
        lines.append(f"  is relayq-admin listening at {address}?"
                     " (--admin or RELAYQ_ADMIN_ADDRESS)")
    elif code == grpc.StatusCode.UNAUTHENTICATED and not had_token:
        lines.append("  no token given: use --token or RELAYQ_ADMIN_TOKEN")
    return "\n".join(lines)


def _rich_status(call: grpc.Call) -> Any:
    try:
        return rpc_status.from_call(call)
    except ValueError:
        # The trailer disagrees with the status line: show the status line only.
        return None


def _address(flag: str | None, env: Env) -> str:
    if flag is None:
        return env.address("RELAYQ_ADMIN_ADDRESS", DEFAULT_ADDRESS)
    return Env({"--admin": flag}).address("--admin", DEFAULT_ADDRESS)


def _ca_file(flag: str | None, env: Env) -> Path | None:
    if flag is None:
        return env.file("RELAYQ_ADMIN_CA_FILE")
    return Env({"--ca-file": flag}).file("--ca-file")


def _channel(address: str, ca_file: Path | None) -> grpc.Channel:
    if ca_file is None:
        return grpc.insecure_channel(address)
    try:
        root = ca_file.read_bytes()
    except OSError as exc:
        raise ConfigError("--ca-file", f"cannot read {ca_file}: {exc}") from exc
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root))
