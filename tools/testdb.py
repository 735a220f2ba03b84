"""`python -m tools.testdb COMMAND...`: run the test suite with a database (make test).

Uses the PostgreSQL at RELAYQ_TEST_DATABASE_URL when it answers, else starts an embedded one
(relayq.cli.embedded, as `relayq up` does) under .relayq/test-pgdata for the run, so
`make test` works on a machine with no PostgreSQL at all. A test runner, so it lives here and
not in the relayq package that ships.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from relayq.cli.embedded import EmbeddedPostgres


def run_with_test_database(command: list[str], data_dir: Path) -> int:
    """Run `command` (the test suite) against the PostgreSQL in RELAYQ_TEST_DATABASE_URL, or,
    when nothing answers there, against an embedded one started for the run."""
    dsn = os.environ.get("RELAYQ_TEST_DATABASE_URL",
                         "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            pass
    except psycopg.OperationalError:
        pass
    else:
        return subprocess.call(command)
    print(f"no PostgreSQL answers at {dsn}; starting an embedded one in {data_dir}",
          flush=True)
    server = EmbeddedPostgres(data_dir, data_dir.parent / "logs" / "test-postgres.log")
    server.start(preferred_port=0)
    try:
        env = {**os.environ, "RELAYQ_TEST_DATABASE_URL": server.server_dsn}
        return subprocess.call(command, env=env)
    finally:
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tools.testdb COMMAND...")
    sys.exit(run_with_test_database(sys.argv[1:], Path(".relayq/test-pgdata").resolve()))
