"""relayq secrets: keys for secrets sealed at rest (jobsdb.sealing).

`new-key` prints a key for RELAYQ_SECRET_KEYS. `rekey` re-seals every secret, header and
endpoint credential under the first key of RELAYQ_SECRET_KEYS (and seals any still in clear),
so the keys after it can be dropped. A rotation, without a delivery failing:

1. give every router and admin service RELAYQ_SECRET_KEYS=<new>,<old> and restart them;
2. `RELAYQ_SECRET_KEYS=<new>,<old> relayq secrets rekey`;
3. drop <old> from RELAYQ_SECRET_KEYS and restart them.
"""

from __future__ import annotations

import argparse
import asyncio

from psycopg import AsyncConnection

from jobsdb import migrate, sealing
from relayq.config import Env, secret_keys


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser("secrets", help="keys for secrets sealed at rest")
    actions = cmd.add_subparsers(dest="action", required=True, metavar="action")
    new = actions.add_parser("new-key", help="print a new key for RELAYQ_SECRET_KEYS")
    new.set_defaults(run=lambda args: print(sealing.new_key()) or 0)
    rekey = actions.add_parser(
        "rekey", help="re-seal every secret under the first key of RELAYQ_SECRET_KEYS"
                      " (RELAYQ_DATABASE_URL)")
    rekey.add_argument("--wait", type=float, default=30.0,
                       help="seconds to wait for Postgres to answer (default 30)")
    rekey.set_defaults(run=run_rekey)


def run_rekey(args: argparse.Namespace) -> int:
    env = Env()
    dsn, keyring = env.database_url(), secret_keys(env)

    async def rekey() -> tuple[int, set[str]]:
        await migrate.prepare(dsn, apply=True, wait_seconds=args.wait,
                              application_name="relayq-secrets")
        async with await AsyncConnection.connect(dsn, application_name="relayq-secrets"
                                                 ) as conn:
            async with conn.transaction():
                await sealing.lock(conn)
                await sealing.check_keys(conn, keyring)
                changed = await sealing.seal_all(conn, keyring, rekey=True)
            return changed, await sealing.key_ids_in_use(conn)

    changed, in_use = asyncio.run(rekey())
    print(f"re-sealed {changed} destination(s) and secret(s) under key {keyring.ids[0]};"
          f" keys in use now: {', '.join(sorted(in_use)) or 'none'}")
    return 0
