"""Several processes serving one service: RELAYQ_INGEST_WORKERS and RELAYQ_ROUTER_WORKERS.

A relayq process runs one event loop, so it uses one core at most. With N workers the console
script (relayq-ingest, relayq-router) becomes their supervisor, and each worker is the same
service started again with a few variables of its own (relayq.worker). The supervisor:

- does once, before any worker starts, what would otherwise fail N times alike: reads the
  configuration (exit 2 naming the variable), checks the gRPC and metrics addresses and holds
  the gRPC port for its workers (exit 1 naming the variable; relayq.addresses.reserve), waits
  for Postgres and migrates (exit 1 with Postgres's own message);
- starts the workers. They share the gRPC port (SO_REUSEPORT: the kernel spreads new
  connections over them) and, routers, the partition leases, each worker a router of its own
  under the id `<router id>/<worker number>`, stable across restarts;
- serves /metrics on the service's metrics address: the workers' counters and histograms
  added up (prometheus_client's multiprocess mode, in a directory made fresh for each start
  and removed at exit), a dead worker's counts included, so a scrape sees one service however
  many workers serve it and however often one was restarted;
- restarts a worker that dies: at once if it had run for a while, else after a backoff that
  doubles from half a second. A worker dying within seconds of its start five times in a row
  is no passing trouble: every worker is stopped and the service exits 1 saying so. While the
  service starts there is no second chance at all: a worker that cannot start fails it at
  once, with the worker's own one line;
- on SIGTERM or SIGINT forwards SIGTERM to every worker and waits for them all within
  RELAYQ_SHUTDOWN_TIMEOUT_SECONDS (each drains as a lone process does, and exits 1 past that
  same deadline, saying so); a worker still running a moment after it is killed. The exit
  status is 0 when every worker drained cleanly, else 1. A second signal kills the workers and
  ends the supervisor at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from relayq import addresses, runtime, worker
from relayq.config import ConfigError, Env
from relayq.supervision import metrics
from relayq.supervision.keeper import Keeper
from relayq.supervision.plan import Config, Plan, Served, migrated

__all__ = ["Config", "Plan", "Served", "migrated", "run"]

log = logging.getLogger(__name__)


def run(name: str, load: Callable[[Env], Config], config: Config, plan: Plan[Config],
        count: int, timeout: float) -> tuple[int, str]:
    """Supervise `count` workers until a signal; the exit status and the line to print."""
    server = config.server
    try:
        reservation = addresses.reserve(server.address_variable, server.address)
    except addresses.AddressUnusable as exc:
        return 1, f"{name}: {exc}"
    directory: str | None = None
    stop_metrics: Callable[[], None] | None = None
    try:
        if server.metrics_address is not None:
            # Where the workers count, for the supervisor to add up; none without /metrics.
            directory = metrics.make_directory(name)
        # Again with the port bound (the system's choice, for port 0): a router's default id
        # is made of it. Each worker's own settings are checked here too, once.
        base = {k: v for k, v in os.environ.items() if k not in metrics.MULTIPROC}
        config = load(Env({**base, server.address_variable: reservation.address}))
        environs = [_environment(base, config, plan, index, reservation.address, directory)
                    for index in range(1, count + 1)]
        for environ in environs:
            load(Env(environ))
        if directory is not None:
            stop_metrics = metrics.serve(server, directory)
        return runtime.run(Keeper(name, plan, config, environs, timeout, directory).run())
    except ConfigError as exc:
        return 2, f"{name}: bad configuration: {exc}"
    except addresses.AddressUnusable as exc:
        return 1, f"{name}: {exc}"
    except OSError as exc:  # mkdtemp: TMPDIR unwritable, say
        return 1, f"{name}: cannot make a directory for the workers' metrics: {exc}"
    finally:
        if stop_metrics is not None:
            stop_metrics()
        reservation.close()
        if directory is not None:
            metrics.remove(directory)


def _environment(base: Mapping[str, str], config: Config, plan: Plan[Config], index: int,
                 address: str, directory: str | None) -> dict[str, str]:
    server = config.server
    return {
        **base,
        server.address_variable: address,
        server.metrics_variable: "off",  # the supervisor serves everyone's
        **({"PROMETHEUS_MULTIPROC_DIR": directory} if directory is not None else {}),
        "RELAYQ_MIGRATE": "false",  # the supervisor did, or checked
        worker.INDEX: str(index),
        worker.SUPERVISOR: str(os.getpid()),
        **plan.environment(config, index),
    }
