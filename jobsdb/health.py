"""What this process has lately seen of its database, for health checks and logs.

Every transaction (jobsdb.pool.transaction) and every connection a pool opens reports here
when Postgres is unreachable, refuses connections or is out of disk space. The database is
reported in trouble while such failures keep coming (the last within WINDOW seconds): a
full disk does not show in a probe that only reads (Postgres still reads, and even writes
into pages with room), so the work itself is the probe, and services retry theirs while it
fails. When failures stop for WINDOW seconds it is reported well again, without a restart.
"""

from __future__ import annotations

import time

from jobsdb.errors import DatabaseUnavailable, JobsDBError

WINDOW = 5.0


class DatabaseHealth:
    def __init__(self) -> None:
        self._problem = ""
        self._last_failure = float("-inf")

    def failed(self, exc: JobsDBError) -> None:
        """A failure the database's state explains (not a bad request's)."""
        if isinstance(exc, DatabaseUnavailable):
            self._problem = str(exc)
            self._last_failure = time.monotonic()

    def problem(self) -> str | None:
        """Why the database is in trouble now, or None."""
        if time.monotonic() - self._last_failure < WINDOW:
            return self._problem
        return None


# The process's one view of its database (every pool reports to it).
STATE = DatabaseHealth()
