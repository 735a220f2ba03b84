"""relayq migrate: apply the database migrations."""

from __future__ import annotations

import argparse
import asyncio

from jobsdb import migrate
from relayq.config import Env


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser("migrate", help="apply database migrations (RELAYQ_DATABASE_URL)")
    cmd.add_argument("--wait", type=float, default=30.0,
                     help="seconds to wait for Postgres to answer (default 30)")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    dsn = Env().database_url()

    async def apply() -> None:
        settings = await migrate.prepare(dsn, apply=True, wait_seconds=args.wait,
                                         application_name="relayq-migrate")
        print(f"schema is current (ordering partitions: {settings.ordering_partitions},"
              f" event partition size: {settings.event_partition_size})")

    asyncio.run(apply())
    return 0
