"""The `relayq` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from jobsdb import errors as dberrors
from relayq import logs, terminal
from relayq.cli import (
    connections,
    destinations,
    events,
    jobs,
    migrate,
    replays,
    secrets,
    send,
    sources,
    stats,
    tenants,
    tokens,
    up,
)
from relayq.config import ConfigError

# Each module adds its subcommands: register(subparsers). The chosen one runs as
# args.run(args) and returns the exit status.
_MODULES: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    migrate.register,
    up.register,
    jobs.register,
    events.register,
    stats.register,
    tenants.register,
    sources.register,
    destinations.register,
    connections.register,
    replays.register,
    tokens.register,
    send.register,
    secrets.register,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayq", description="relayq: a Postgres-backed event queue.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for register in _MODULES:
        register(commands)
    return parser


# What a tool killed by SIGPIPE exits with (128 + 13), as `yes | head` reports for `yes`.
_EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.configure("warning", "text")
    try:
        status = args.run(args)
        # Here, not at exit: a reader gone (`relayq stats | head -3`) is handled below.
        sys.stdout.flush()
        sys.exit(status)
    except BrokenPipeError:
        # Whoever read the output stopped reading: stop quietly, as `head` expects.
        terminal.silence(sys.stdout)
        sys.exit(_EXIT_BROKEN_PIPE)
    except ConfigError as exc:
        print(f"relayq: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    except dberrors.JobsDBError as exc:
        print(f"relayq: {exc}", file=sys.stderr)
        sys.exit(1)
