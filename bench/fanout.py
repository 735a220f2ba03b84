"""End to end at fan-out: events sent to a source connected to many destinations, until every
job is delivered and on record.

    .venv/bin/python bench/fanout.py [--events 40000] [--destinations 10] [--kind grpc]
    .venv/bin/python bench/fanout.py --smoke     # seconds: checks the script runs

One relayq-ingest and one relayq-router (one worker each) over a fresh database; one source
connected to `--destinations` destinations, all served by one sink process that answers at
once; raw gRPC stub clients (bench/ingest.py's, 2 processes x 4 clients, batches of 100) send
the events as fast as ingest takes them while the router delivers. The clock runs from the
first send to the moment every job's success is counted in Postgres (delivery_counts, which
GetStats reads, and which the router writes in the transaction that records the delivery),
so a pipeline that takes events faster than it delivers them gets no credit for it.

Prints events/s and jobs/s end to end, and CPU per event of ingest, the router and their
Postgres backends. Its schema-agnostic counting lets it run against checkouts from before the
event log too (a git worktree), for before/after figures in one session.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_source,
    cpu_seconds,
    cpu_since,
    create_database,
    drop_database,
    dsn_for,
    free_port,
    service_cpu,
    spawn,
    wait_ready,
)
from bench.ingest import BATCH, client_process
from bench.router_backlog import _backends
from bench.router_common import QUIET, Sink, stop, wait_recorded


def run(events: int, destinations: int, kind: str, processes: int = 2, clients: int = 4
        ) -> tuple[float, float]:
    """Events/s and jobs/s end to end."""
    name = create_database()
    sink = Sink(kind)
    ingest = router = None
    try:
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            write_key, *_ = add_source(conn, "bench", "web", {
                f"d{n}": (kind, sink.endpoint) for n in range(destinations)})
        env = {**QUIET, "RELAYQ_DATABASE_URL": dsn_for(name), "RELAYQ_LOG_LEVEL": "warning"}
        ingest_port, router_port = free_port(), free_port()
        ingest = spawn("ingest_service.main", {**env, "RELAYQ_INGEST_ADDRESS":
                                               f"127.0.0.1:{ingest_port}"})
        router = spawn("router_service.main", {**env, "RELAYQ_ROUTER_ADDRESS":
                                               f"127.0.0.1:{router_port}"})
        wait_ready(ingest_port)
        wait_ready(router_port)
        time.sleep(1.0)  # the router's first heartbeat and reads
        batches = max(1, events // BATCH // (processes * clients))
        sent = batches * BATCH * processes * clients
        jobs = sent * destinations
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        start_at = time.time() + 3 + 0.5 * processes
        senders = [context.Process(target=client_process, args=(
            ingest_port, write_key, f"p{p}", clients, batches, start_at, results))
                   for p in range(processes)]
        backends = {p: cpu_seconds(p) for p in _backends(name)}
        ingest_cpu, router_cpu = service_cpu(ingest.pid), service_cpu(router.pid)
        for s in senders:
            s.start()
        acked = [results.get(timeout=900) for _ in senders]
        for s in senders:
            s.join()
        if sum(a[0] for a in acked) != sent:
            raise SystemExit(f"accepted {sum(a[0] for a in acked)} of {sent} events")
        sent_by = max(a[1] for a in acked)
        done_at = wait_recorded(name, jobs, within=1200)
        elapsed = done_at - start_at
        ingest_used = cpu_since(ingest_cpu, service_cpu(ingest.pid))
        router_used = cpu_since(router_cpu, service_cpu(router.pid))
        pg_used = sum(cpu_seconds(p) - backends.get(p, 0.0) for p in _backends(name))
        per_event = 1e6 / sent
        print(f"fan-out {destinations} ({kind}): {sent:,} events = {jobs:,} jobs, all recorded"
              f" {elapsed:.1f}s after the first send (sending took {sent_by - start_at:.1f}s):"
              f" {sent / elapsed:,.0f} events/s, {jobs / elapsed:,.0f} jobs/s")
        print(f"  CPU per event: ingest {ingest_used * per_event:.0f} us, router"
              f" {router_used * per_event:.0f} us, their Postgres backends"
              f" {pg_used * per_event:.0f} us")
        return sent / elapsed, jobs / elapsed
    finally:
        for process in (ingest, router):
            if process is not None:
                stop(process)
        if sink.process.poll() is None:
            sink.process.kill()
        drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--destinations", type=int, default=10)
    parser.add_argument("--kind", choices=("grpc", "webhook"), default="grpc")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, tiny sizes")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.destinations = 2_000, 3
    rates = [run(args.events, args.destinations, args.kind)[0] for _ in range(args.rounds)]
    if len(rates) > 1:
        print(f"events/s over {len(rates)} rounds: {min(rates):,.0f}-{max(rates):,.0f}")


if __name__ == "__main__":
    main()
