"""A diagnostic around `bench/router.py throughput`, not a benchmark of its own (issue 16's
section of docs/benchmarks.md): it runs the checkout's own `bench.router` with patches.

    (cd CHECKOUT && .venv/bin/python <main>/bench/patches/diag_router.py KIND JOBS DESTINATIONS
                                     TENANTS [unpaused] [nolog] [workers=N] [batch=N])

- By default every statement's duration is logged for the run's database only
  (`ALTER DATABASE ... SET log_min_duration_statement = 0`), to sum from the server's log.
- `workers=N`: RELAYQ_ROUTER_WORKERS (default 1); `batch=N`: webhooks take N events a request.
- `unpaused`: the destinations are not paused while the router starts, so that they follow
  the shared read of the log from the first event instead of lagging (what a paused start
  does). The router then delivers before the benchmark's clock starts: its Postgres backends
  count whole (the first look at them sees none), its own CPU from after its first second.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path.cwd()))

import bench.router as router  # the checkout's own (run from its root)
from bench.common import SERVER, dsn_for

_create = router.create_database


def create_database() -> str:
    name = _create()
    print("database", name, flush=True)
    if "nolog" not in sys.argv:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET log_min_duration_statement = 0')
            conn.execute(f'ALTER DATABASE "{name}" SET log_parameter_max_length = 0')
    return name


_configure = router.configure


def unpaused(*args: Any, **columns: Any) -> Any:
    columns["paused"] = False
    return _configure(*args, **columns)


_wait_finished = router._wait_finished


def wait_finished(name: str, jobs: int, *args: Any, **kwargs: Any) -> float:
    finished = _wait_finished(name, jobs, *args, **kwargs)
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('destination_cursors')").fetchone()
        if row and row[0]:
            cursors = conn.execute("SELECT count(*) FROM destination_cursors").fetchone()
            print("destination_cursors rows:", cursors, flush=True)
    return finished


_backends = router._backends
_looked: list[int] = []


def backends_after_the_first_look(name: str) -> list[int]:
    _looked.append(1)
    return [] if len(_looked) == 1 else _backends(name)


def main() -> None:
    kind, jobs, destinations, tenants = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                         int(sys.argv[4]))
    router.create_database = create_database
    router._wait_finished = wait_finished
    if "unpaused" in sys.argv:
        router.configure = unpaused
        router._backends = backends_after_the_first_look
    workers = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("workers=")), "1")
    batch = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("batch=")), "1"))
    router.throughput(jobs, kind, destinations, tenants, workers, None, batch)


if __name__ == "__main__":
    main()
