"""`python -m relayq.cli.testdb COMMAND...`: run the test suite with a database (make test).

Uses the PostgreSQL at RELAYQ_TEST_DATABASE_URL when it answers, else starts an embedded one
under .relayq/test-pgdata for the run (relayq.cli.embedded).
"""

from __future__ import annotations

import sys
from pathlib import Path

from relayq.cli.embedded import run_with_test_database

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m relayq.cli.testdb COMMAND...")
    sys.exit(run_with_test_database(sys.argv[1:], Path(".relayq/test-pgdata").resolve()))
