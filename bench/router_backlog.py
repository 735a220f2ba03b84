"""Router benchmarks over a backlog written straight into Postgres: throughput, scaling over
cores, history over partition rounds, and what an idle router costs (bench/router.py says
what each measures)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass
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
    histogram_means,
    service_cpu,
    spawn,
    wait_ready,
    workers_of,
)
from bench.ingest import payload
from bench.router_common import QUIET, Sink, stop, wait_recorded
from jobsdb import partitions
from jobsdb.ingest import NewEvent, store_events


@dataclass(frozen=True)
class Target:
    tenant: int
    source: int
    destination: int


def configure(name: str, kind: str, endpoint: str, destinations: int, tenants: int,
              **columns: object) -> list[Target]:
    """`destinations` destinations spread over `tenants` tenants, one source each."""
    targets = []
    with psycopg.connect(dsn_for(name), autocommit=True) as conn, conn.transaction():
        for t in range(tenants):
            _, tenant, source, keys = add_source(
                conn, f"bench{t}", f"web{t}",
                {f"d{i}": (kind, endpoint) for i in range(t, destinations, tenants)},
                **columns)
            targets += [Target(tenant, source, key) for key in keys.values()]
    return targets


def preload(name: str, targets: list[Target], jobs: int, users: int = 10_000,
            seed: int = 7, at_once: bool = False) -> None:
    """`jobs` jobs, each for a random user and a random destination, straight into Postgres
    (committed every 5,000 jobs, or all `at_once` so that a running router sees them at once).
    """
    rng = random.Random(seed)
    body = payload(1)

    async def write() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name)) as conn:
            for start in range(0, jobs, 5000):
                events = []
                for i in range(start, min(start + 5000, jobs)):
                    to = rng.choice(targets)
                    message_id = f"m{seed}-{i}"
                    events.append(NewEvent(to.source, to.tenant, message_id,
                                           f"user-{rng.randrange(users)}",
                                           f'{{"messageId":"{message_id}","properties":{body}}}',
                                           (to.destination,)))
                await store_events(conn, events, ordering_partitions=64)
                if not at_once:
                    await conn.commit()
            await conn.commit()

    asyncio.run(write())


def throughput(jobs: int, kind: str, destinations: int, tenants: int, workers: str = "1",
               cpus: str | None = None, batch: int = 1,
               start: str = "paused") -> tuple[float, float, float]:
    """One router service (RELAYQ_ROUTER_WORKERS=`workers`, on `cpus` when given) delivers a
    backlog (to webhooks taking `batch` events a request). Returns jobs/s delivered and
    recorded, and the router's CPU per job (us).

    `start`: "paused", the destinations are paused until the router is up, so that its
    start-up is not counted and none of the work is done before the counting starts; over
    the event log that makes every destination catch up on its own when it resumes (the path
    of a destination resumed after a pause). "running": the router starts on the backlog with
    every destination taking it, as after a restart (the path of a router that follows the
    log); its Postgres backends count whole, its own CPU from its first second on, and jobs/s
    from the first arrival at the sink as always.
    """
    name = create_database()
    sink = Sink(kind)
    try:
        columns: dict[str, object] = {"paused": start == "paused"}
        if batch > 1:
            columns["batch_max_events"] = batch
        preload(name, configure(name, kind, sink.endpoint, destinations, tenants, **columns),
                jobs)
        port, metrics_port = free_port(), free_port()
        router = spawn("router_service.main", {
            **QUIET, "RELAYQ_DATABASE_URL": dsn_for(name),
            "RELAYQ_ROUTER_ADDRESS": f"127.0.0.1:{port}",
            "RELAYQ_ROUTER_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
            "RELAYQ_ROUTER_WORKERS": workers}, cpus)
        wait_ready(port)
        time.sleep(1.0)  # its first heartbeat and reads are done
        _wait_split(name, len(workers_of(router.pid)) or 1)
        # The router's pool opens connections as it needs them: backends that appear later
        # started from nothing (and are found at the end, before the router lets them go).
        # A router started on the backlog has been at work since it started: count whole.
        backends = {p: cpu_seconds(p) for p in _backends(name)} if start == "paused" else {}
        router_before, sink_cpu = service_cpu(router.pid), cpu_seconds(sink.process.pid)
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            conn.execute("UPDATE destinations SET paused = false")
        recorded_at = wait_recorded(name, jobs)
        router_cpu = cpu_since(router_before, service_cpu(router.pid))
        sink_cpu = cpu_seconds(sink.process.pid) - sink_cpu
        pg_cpu = sum(cpu_seconds(p) - backends.get(p, 0.0) for p in _backends(name))
        stats = histogram_means(metrics_port, "relayq_router_log_read_events",
                                "relayq_router_flush_items", "relayq_router_flush_seconds")
        stop(router)
        arrivals = sink.arrivals()
        first = min(arrivals.values())
        elapsed = max(arrivals.values()) - first
        shape = (f"{workers} worker(s)" + (f" on CPUs {cpus}" if cpus else "")
                 + f", started {start}"
                 + f", {kind} sink" + (f" taking batches of {batch}" if batch > 1 else ""))
        print(f"throughput ({shape}, {destinations:,} destinations of"
              f" {tenants:,} tenants, 10,000 users, ordering on):"
              f" {len(arrivals):,} jobs in {elapsed:.1f}s = {len(arrivals) / elapsed:,.0f} jobs/s")
        # Delivered is not done: a job counts once its success is on record (until then a
        # crash would deliver it again), and a router that delivers faster than it records
        # only moves the wait to the end.
        print(f"  recorded: all {jobs:,} succeeded in Postgres {recorded_at - first:.1f}s after"
              f" the first arrival = {jobs / (recorded_at - first):,.0f} jobs/s")
        print(f"  CPU per job: router {router_cpu / jobs * 1e6:.0f} us, its Postgres backends"
              f" {pg_cpu / jobs * 1e6:.0f} us, sink {sink_cpu / jobs * 1e6:.0f} us")
        reads, flushes = stats["relayq_router_log_read_events"], stats["relayq_router_flush_items"]
        print(f"  {reads[0]:,.0f} reads of the log, {reads[1]:.0f} events each on average;"
              f" {flushes[0]:,.0f}"
              f" outcome transactions of {flushes[1]:.0f} jobs,"
              f" {stats['relayq_router_flush_seconds'][1] * 1000:.1f} ms each")
        return (len(arrivals) / elapsed, jobs / (recorded_at - first), router_cpu / jobs * 1e6)
    finally:
        if sink.process.poll() is None:
            sink.process.kill()
        drop_database(name)


def _wait_split(name: str, routers: int, within: float = 60) -> None:
    """Until `routers` routers (a service's workers) hold every partition between them, each
    its share: a worker that started a moment after another first waits for it to give back
    what it took alone (within two heartbeats)."""
    deadline = time.monotonic() + within
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = conn.execute("SELECT owner, count(*) FROM router_leases WHERE expires_at >"
                                " now() GROUP BY owner").fetchall()
            held = sorted(int(count) for owner, count in rows if owner is not None)
            if len(held) == routers and sum(held) == 64 and held[-1] - held[0] <= 1:
                return
            time.sleep(0.2)
    raise SystemExit(f"the partitions were not split between {routers} routers in time")


# (RELAYQ_ROUTER_WORKERS, CPUs the service may use): one core, then two, first for one process.
SCALING = (("1", "0"), ("1", "0,1"), ("2", "0,1"))


def scaling(jobs: int, rounds: int, shapes: tuple[tuple[str, str], ...] = SCALING) -> None:
    """The same backlog through each shape in turn, `rounds` times: one core to two."""
    seen: dict[tuple[str, str], list[tuple[float, float, float]]] = {s: [] for s in shapes}
    for _ in range(rounds):
        for workers, cpus in shapes:
            seen[workers, cpus].append(throughput(jobs, "grpc", 50, 1, workers, cpus))
    for (workers, cpus), figures in seen.items():
        delivered, recorded, cpu = zip(*figures, strict=True)
        print(f"{workers} worker(s) on CPUs {cpus}: delivered {min(delivered):,.0f}-"
              f"{max(delivered):,.0f}, recorded {min(recorded):,.0f}-{max(recorded):,.0f}"
              f" jobs/s; router CPU {min(cpu):.0f}-{max(cpu):.0f} us per job")


def _backends(name: str) -> list[int]:
    from bench.common import SERVER

    with psycopg.connect(SERVER, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (name,)).fetchall()
    return [int(r[0]) for r in rows]


# --- history -------------------------------------------------------------------------------

def history(rounds: int, jobs: int, keep: bool) -> None:
    """Round after round of `jobs` jobs through one router, each round in a job partition of
    its own (the sequence is moved to the next partition's start, as if a million jobs had
    gone by). The router's own maintenance runs as shipped, with retention and the dedupe
    window at their shortest (60 s), unless `keep` turns it off: throughput and disk per round
    show whether they stay flat as the history grows."""
    name = create_database()
    sink = Sink("grpc")
    router = None
    try:
        targets = configure(name, "grpc", sink.endpoint, 50, 1)
        port = free_port()
        router = spawn("router_service.main", {
            **QUIET, "RELAYQ_DATABASE_URL": dsn_for(name),
            "RELAYQ_ROUTER_ADDRESS": f"127.0.0.1:{port}",
            "RELAYQ_MAINTENANCE": "false" if keep else "true",
            "RELAYQ_RETENTION_SECONDS": "60", "RELAYQ_DEDUPE_WINDOW_SECONDS": "60"})
        wait_ready(port)
        print(f"history: {rounds} rounds of {jobs:,} jobs, 50 destinations, one router,"
              f" maintenance {'off' if keep else 'on (retention and dedupe window 60 s)'}")
        print("  round  jobs/s  database MB  job partitions  seconds since start")
        begun = time.time()
        for number in range(rounds):
            asyncio.run(_next_partition(name))
            preload(name, targets, jobs, seed=number, at_once=True)
            committed = time.time()
            finished = wait_recorded(name, jobs * (number + 1))
            size, count = _footprint(name)
            print(f"  {number + 1:5d}  {jobs / (finished - committed):6,.0f}  {size:11,.0f}"
                  f"  {count:14d}  {finished - begun:19.0f}")
    finally:
        if router is not None:
            stop(router)
        sink.process.kill()
        drop_database(name)


async def _next_partition(name: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as conn:
        size = (await partitions.settings(conn)).event_partition_size
        cur = await conn.execute("SELECT last_value FROM events_event_id_seq")
        row = await cur.fetchone()
        start = (int(row[0]) // size + 1) * size if row else size
        await partitions.ensure(conn, upto_event_id=start)
        await conn.execute("SELECT setval('events_event_id_seq', %s)", (start,))


def _footprint(name: str) -> tuple[float, int]:
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_database_size(current_database()) / 1e6,"
            " (SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass)").fetchone()
    assert row is not None
    return float(row[0]), int(row[1])


# --- idle ----------------------------------------------------------------------------------

def idle(destinations: int, tenants: int, seconds: float) -> None:
    """What a router and its Postgres backends cost with many destinations and no traffic: first
    with destinations that never had a job, then right after one job reached every one of them
    (every destination has a lane), then once those lanes have been closed for idleness."""
    name = create_database()
    sink = Sink("grpc")
    router = None
    try:
        targets = configure(name, "grpc", sink.endpoint, destinations, tenants)
        port = free_port()
        router = spawn("router_service.main", {
            **QUIET, "RELAYQ_DATABASE_URL": dsn_for(name),
            "RELAYQ_ROUTER_ADDRESS": f"127.0.0.1:{port}"})
        wait_ready(port)
        time.sleep(5)  # past start-up: partitions claimed, destinations loaded
        print(f"idle: {destinations:,} destinations of {tenants:,} tenants, one router")
        _idle_cost("never had a job", router.pid, name, seconds)

        started = time.time()
        asyncio.run(_one_job_each(name, targets))
        wait_recorded(name, len(targets))
        print(f"  one job to each destination: all {len(targets):,} recorded in"
              f" {time.time() - started:.1f}s")
        _idle_cost("just after (a lane per destination)", router.pid, name, seconds)
        time.sleep(60)
        _idle_cost("a minute later (idle lanes closed)", router.pid, name, seconds)
    finally:
        if router is not None:
            stop(router)
        sink.process.kill()
        drop_database(name)


async def _one_job_each(name: str, targets: list[Target]) -> None:
    body = payload(1)
    async with await psycopg.AsyncConnection.connect(dsn_for(name)) as conn:
        for start in range(0, len(targets), 5000):
            events = [NewEvent(to.source, to.tenant, f"one-{i}", f"user-{i}",
                               f'{{"messageId":"one-{i}","properties":{body}}}',
                               (to.destination,))
                      for i, to in enumerate(targets[start:start + 5000], start)]
            await store_events(conn, events, ordering_partitions=64)
            await conn.commit()


def _idle_cost(label: str, router_pid: int, name: str, seconds: float) -> None:
    backends = {p: cpu_seconds(p) for p in _backends(name)}
    router_cpu = cpu_seconds(router_pid)
    time.sleep(seconds)
    router_cpu = cpu_seconds(router_pid) - router_cpu
    pg_cpu = sum(cpu_seconds(p) - backends.get(p, 0.0) for p in _backends(name))
    print(f"  {label}: router {router_cpu / seconds * 100:.1f}% of a core, its Postgres"
          f" backends {pg_cpu / seconds * 100:.1f}% (over {seconds:.0f}s)")


