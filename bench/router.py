"""Router benchmarks: throughput, end-to-end latency, and tenant isolation under a flood.

    .venv/bin/python bench/router.py --smoke      # every mode, tiny sizes, about a minute
    .venv/bin/python bench/router.py throughput [--jobs 200000] [--kind grpc|webhook] [--batch N]
                                                [--destinations 50] [--tenants 1]
                                                [--workers 1] [--service-cpus 0,1]
    .venv/bin/python bench/router.py scaling [--jobs 200000] [--rounds 3]
    .venv/bin/python bench/router.py idle [--destinations 10000] [--tenants 100]
    .venv/bin/python bench/router.py history [--rounds 12] [--jobs 100000] [--keep]
    .venv/bin/python bench/router.py latency [--rate 1000] [--seconds 20]
    .venv/bin/python bench/router.py fairness [--seconds 15]

throughput: jobs for 10,000 users and 50 destinations are written straight into a fresh
database, then one relayq-router delivers them (ordering on, as always) to a sink process that
answers at once. Jobs/s is measured at the sink, from the first arrival to the last.

scaling: throughput with one router worker on one core, one on two, two on two, in turn.

history: rounds of jobs through one router, finished partitions dropped between rounds (or
kept): throughput and database size per round.

idle: what one router and its Postgres backends cost with many destinations and no traffic.

latency: relayq-ingest, relayq-router and a webhook sink; a client sends events at a steady
rate (batches of 10) and notes when each batch was acknowledged; the sink notes when each
event arrived. Reported: p50/p99 of arrival minus ack (and minus send).

fairness: tenant B sends 100 events/s to its webhook and its p50/p99 (ack to arrival) are
measured alone, then again while tenant A floods its own webhook with as many events as ingest
takes, on top of a 100,000-job backlog. B's time is also split where it is spent: send -> ack
(ingest: validation and the group commit), ack -> dispatch (queued in relayq until the router
starts the delivery: the attempt's started_at, from the router's clock on this machine), and
dispatch -> sink.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
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
    percentile,
    service_cpu,
    spawn,
    wait_ready,
    workers_of,
)
from bench.ingest import payload
from jobsdb import partitions
from jobsdb.ingest import NewEvent, store_events
from relayq.v1 import ingest_pb2

QUIET = {"RELAYQ_MAINTENANCE": "false", "RELAYQ_INGEST_METRICS_ADDRESS": "off",
         "RELAYQ_ROUTER_METRICS_ADDRESS": "off"}


class Sink:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.out = Path(tempfile.mkstemp(prefix="relayq-sink-")[1])
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "sink.py"), "--kind", kind,
             "--port", str(self.port), "--out", str(self.out)])
        time.sleep(1.0)

    @property
    def endpoint(self) -> str:
        return (f"127.0.0.1:{self.port}" if self.kind == "grpc"
                else f"http://127.0.0.1:{self.port}/hook")

    def arrivals(self) -> dict[str, float]:
        """Stop the sink and read when each message first arrived."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        seen: dict[str, float] = {}
        for line in self.out.read_text().splitlines():
            message_id, when = line.split()
            seen.setdefault(message_id, float(when))
        self.out.unlink()
        return seen


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# --- throughput --------------------------------------------------------------------------

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
               cpus: str | None = None, batch: int = 1) -> tuple[float, float, float]:
    """One router service (RELAYQ_ROUTER_WORKERS=`workers`, on `cpus` when given) delivers a
    backlog (to webhooks taking `batch` events a request). Returns jobs/s delivered and
    recorded, and the router's CPU per job (us)."""
    name = create_database()
    sink = Sink(kind)
    try:
        # Paused until the router is up, so that its start-up is not counted and none of the
        # work is done before the counting starts.
        columns: dict[str, object] = {"paused": True}
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
        backends = {p: cpu_seconds(p) for p in _backends(name)}
        router_before, sink_cpu = service_cpu(router.pid), cpu_seconds(sink.process.pid)
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            conn.execute("UPDATE destinations SET paused = false")
        recorded_at = _wait_finished(name, jobs)
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


def _wait_finished(name: str, jobs: int, within: float = 900) -> float:
    """Wait until every job's success is recorded; returns when that was seen (time.time)."""
    deadline = time.monotonic() + within
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        while time.monotonic() < deadline:
            # What the router counted for GetStats: cheap to read, unlike scanning the jobs.
            row = conn.execute("SELECT coalesce(sum(succeeded), 0) FROM delivery_counts"
                               ).fetchone()
            if row and row[0] >= jobs:
                return time.time()
            time.sleep(0.05)
    raise SystemExit(f"not all {jobs} jobs were delivered in time")


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
            finished = _wait_finished(name, jobs * (number + 1))
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
        _wait_finished(name, len(targets))
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


# --- latency and fairness -----------------------------------------------------------------

class Cluster:
    """A database, relayq-ingest, relayq-router and webhook sinks, all real processes.

    Each tenant gets its own sink process, as tenants' destinations are different servers in
    life: a shared sink would measure how the flooded sink queues, not how relayq isolates.
    """

    def __init__(self) -> None:
        self.name = create_database()
        self.sinks: list[Sink] = []
        self.ingest_port, self.router_port = free_port(), free_port()
        self.keys: dict[str, str] = {}

    def add(self, tenant: str) -> str:
        sink = Sink("webhook")
        self.sinks.append(sink)
        with psycopg.connect(dsn_for(self.name), autocommit=True) as conn:
            write_key, *_ = add_source(conn, tenant, f"{tenant}-web",
                                       {f"{tenant}-hook": ("webhook", sink.endpoint)})
        self.keys[tenant] = write_key
        return write_key

    def start(self) -> None:
        env = {**QUIET, "RELAYQ_DATABASE_URL": dsn_for(self.name),
               "RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{self.ingest_port}",
               "RELAYQ_ROUTER_ADDRESS": f"127.0.0.1:{self.router_port}"}
        self.ingest = spawn("ingest_service.main", env)
        self.router = spawn("router_service.main", env)
        wait_ready(self.ingest_port)
        wait_ready(self.router_port)

    def stop(self) -> dict[str, float]:
        stop(self.router)
        stop(self.ingest)
        arrivals: dict[str, float] = {}
        for sink in self.sinks:
            arrivals.update(sink.arrivals())
        drop_database(self.name)
        return arrivals


async def paced(port: int, write_key: str, prefix: str, rate: float, seconds: float,
                batch: int = 10) -> tuple[dict[str, float], dict[str, float]]:
    """Send `rate` events/s in batches for `seconds`; returns (send times, ack times)."""
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/relayq.v1.Ingest/Ingest",
                               request_serializer=ingest_pb2.IngestRequest.SerializeToString,
                               response_deserializer=ingest_pb2.IngestResponse.FromString)
    metadata = (("authorization", f"Bearer {write_key}"),)
    interval = batch / rate
    body = payload(3)
    tasks: list[asyncio.Task[None]] = []

    async def one(n: int) -> None:
        ids = [f"{prefix}-{n}-{i}" for i in range(batch)]
        request = ingest_pb2.IngestRequest(events=[
            ingest_pb2.Event(message_id=m, user_id=f"user-{random.randrange(10_000)}",
                             type="track", event="Bench", payload_json=body) for m in ids])
        start = time.time()
        await call(request, metadata=metadata, timeout=30)
        done = time.time()
        for m in ids:
            sent[m], acked[m] = start, done

    begin = time.monotonic()
    n = 0
    while time.monotonic() - begin < seconds:
        tasks.append(asyncio.create_task(one(n)))
        n += 1
        await asyncio.sleep(max(0.0, begin + n * interval - time.monotonic()))
    await asyncio.gather(*tasks)
    await channel.close()
    return sent, acked


async def flood(port: int, write_key: str, seconds: float) -> int:
    """As many events as ingest takes: 8 clients sending batches of 100 back to back."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/relayq.v1.Ingest/Ingest",
                               request_serializer=ingest_pb2.IngestRequest.SerializeToString,
                               response_deserializer=ingest_pb2.IngestResponse.FromString)
    metadata = (("authorization", f"Bearer {write_key}"),)
    body = payload(5)
    end = time.monotonic() + seconds
    count = 0

    async def client(c: int) -> None:
        nonlocal count
        n = 0
        while time.monotonic() < end:
            request = ingest_pb2.IngestRequest(events=[
                ingest_pb2.Event(message_id=f"a-{c}-{n}-{i}", user_id=f"user-{i}",
                                 payload_json=body) for i in range(100)])
            await call(request, metadata=metadata, timeout=60)
            count += 100
            n += 1

    await asyncio.gather(*(client(c) for c in range(8)))
    await channel.close()
    return count


def latencies(arrivals: dict[str, float], since: dict[str, float]) -> list[float]:
    return [max(0.0, arrivals[m] - t) * 1000 for m, t in since.items() if m in arrivals]


def report(label: str, values: list[float], expected: int, counted: str = "arrived") -> float:
    p50, p99 = statistics.median(values), percentile(values, 0.99)
    print(f"  {label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(values):,} of {expected:,}"
          f" events {counted})")
    return p99


def latency(rate: float, seconds: float) -> None:
    cluster = Cluster()
    key = cluster.add("bench")
    cluster.start()
    try:
        sent, acked = asyncio.run(paced(cluster.ingest_port, key, "lat", rate, seconds))
        time.sleep(2)
    finally:
        arrivals = cluster.stop()
    print(f"end-to-end latency at {rate:,.0f} events/s for {seconds:.0f}s (webhook sink):")
    report("client send -> ingest ack", latencies(acked, sent), len(sent))
    report("ingest ack -> sink", latencies(arrivals, acked), len(acked))
    report("client send -> sink", latencies(arrivals, sent), len(sent))


def fairness(seconds: float, flood_rate: float) -> None:
    cluster = Cluster()
    key_b = cluster.add("tenant-b")
    key_a = cluster.add("tenant-a")
    cluster.start()
    try:
        alone_sent, alone = asyncio.run(paced(cluster.ingest_port, key_b, "b-alone", 100,
                                              seconds))
        with psycopg.connect(dsn_for(cluster.name), autocommit=True) as conn:
            row = conn.execute("SELECT source_key, tenant_key FROM sources"
                               " WHERE id = 'tenant-a-web'").fetchone()
            dest = conn.execute("SELECT destination_key FROM destinations"
                                " WHERE id = 'tenant-a-hook'").fetchone()
        assert row is not None
        assert dest is not None
        body = payload(9)

        async def backlog() -> None:
            async with await psycopg.AsyncConnection.connect(dsn_for(cluster.name)) as conn:
                for start in range(0, 100_000, 5000):
                    await store_events(conn, [
                        NewEvent(row[0], row[1], f"a-backlog-{i}", f"user-{i % 10_000}",
                                 f'{{"properties":{body}}}', (dest[0],))
                        for i in range(start, start + 5000)], ordering_partitions=64)
                    await conn.commit()

        async def flood_at_rate() -> int:
            if flood_rate <= 0:
                return await flood(cluster.ingest_port, key_a, seconds + 2)
            _, acked = await paced(cluster.ingest_port, key_a, "a-flood", flood_rate,
                                   seconds + 2, batch=100)
            return len(acked)

        async def both() -> tuple[dict[str, float], dict[str, float], int]:
            await backlog()
            flooding = asyncio.create_task(flood_at_rate())
            await asyncio.sleep(1)
            sent, acked = await paced(cluster.ingest_port, key_b, "b-flood", 100, seconds)
            return sent, acked, await flooding

        flood_sent, under_flood, flooded = asyncio.run(both())
        time.sleep(2)
        dispatched = _dispatch_times(cluster.name, "tenant-b-web")
    finally:
        arrivals = cluster.stop()
    delivered_a = sum(1 for m in arrivals if m.startswith("a-"))
    print(f"tenant isolation (webhook sinks, tenant B at 100 events/s, {seconds:.0f}s each):")
    p99_alone = report("B alone, ack -> sink", latencies(arrivals, alone), len(alone))
    p99_flood = report("B while A floods, ack -> sink", latencies(arrivals, under_flood),
                       len(under_flood))
    for label, sent, acked in (("alone", alone_sent, alone),
                               ("while A floods", flood_sent, under_flood)):
        print(f"  B {label}, where the time goes:")
        report("  send -> ack (ingest)", [(acked[m] - t) * 1000 for m, t in sent.items()],
               len(sent), "acknowledged")
        report("  ack -> dispatch (queued in relayq)", latencies(dispatched, acked),
               len(acked), "dispatched")
        report("  dispatch -> sink", latencies(arrivals, {m: dispatched[m] for m in acked
                                                          if m in dispatched}), len(acked))
    rate = f"{flood_rate:,.0f} events/s" if flood_rate > 0 else "as fast as ingest takes them"
    print(f"  A sent {flooded:,} events ({rate}) on top of a 100,000-job backlog;"
          f" {delivered_a:,} of A's jobs were delivered")
    print(f"  B's p99 under the flood / alone: {p99_flood / p99_alone:.2f}")


def _dispatch_times(name: str, source: str) -> dict[str, float]:
    """When the router started each first delivery of the source's events (a delivery's
    started_at is taken from the router's clock as it sends), by message id."""
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT e.message_id, min(extract(epoch FROM"
            "        d.started_at[d.requests[x.n]]))::float8"
            " FROM deliveries d"
            " CROSS JOIN LATERAL unnest(d.event_ids) WITH ORDINALITY AS x(event_id, n)"
            " JOIN events e ON e.event_id = x.event_id"
            " JOIN sources o ON o.source_key = e.source_key WHERE o.id = %s"
            " GROUP BY e.message_id", (source,)).fetchall()
    return {str(m): float(t) for m, t in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every mode at a tiny size (about a minute): for CI, so the"
                             " benchmark cannot rot unnoticed")
    commands = parser.add_subparsers(dest="command")
    t = commands.add_parser("throughput")
    t.add_argument("--jobs", type=int, default=200_000)
    t.add_argument("--kind", choices=("grpc", "webhook"), default="grpc")
    t.add_argument("--destinations", type=int, default=50)
    t.add_argument("--tenants", type=int, default=1)
    t.add_argument("--batch", type=int, default=1,
                   help="webhooks: events per request (the destinations' batch_max_events)")
    t.add_argument("--workers", default="1",
                   help="RELAYQ_ROUTER_WORKERS (default 1; 'auto': one per CPU it may use)")
    t.add_argument("--service-cpus", metavar="LIST",
                   help="run the router under `taskset -c LIST` (e.g. 0 or 0,1); the sink and"
                        " Postgres still run anywhere")
    sc = commands.add_parser("scaling", help="throughput (gRPC, 50 destinations) of 1 worker on"
                             " CPU 0, 1 worker on CPUs 0,1, 2 workers on CPUs 0,1, in turn")
    sc.add_argument("--jobs", type=int, default=200_000)
    sc.add_argument("--rounds", type=int, default=3)
    h = commands.add_parser("history")
    h.add_argument("--rounds", type=int, default=12)
    h.add_argument("--jobs", type=int, default=100_000)
    h.add_argument("--keep", action="store_true",
                   help="maintenance off: finished partitions and dedupe keys stay")
    i = commands.add_parser("idle")
    i.add_argument("--destinations", type=int, default=10_000)
    i.add_argument("--tenants", type=int, default=100)
    i.add_argument("--seconds", type=float, default=30)
    lat = commands.add_parser("latency")
    lat.add_argument("--rate", type=float, default=1000)
    lat.add_argument("--seconds", type=float, default=20)
    f = commands.add_parser("fairness")
    f.add_argument("--seconds", type=float, default=15)
    f.add_argument("--flood-rate", type=float, default=10_000,
                   help="tenant A's events/s (default 100x tenant B's 100/s); 0: as fast as"
                        " ingest takes them")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.smoke:
        throughput(2_000, "grpc", 5, 1)
        throughput(1_000, "webhook", 5, 1)
        throughput(1_000, "webhook", 5, 1, batch=10)
        scaling(2_000, 1, SCALING[-1:])
        idle(200, 10, 3)
        history(2, 2_000, False)
        latency(200, 3)
        fairness(3, 1_000)
    elif args.command is None:
        parser.error("a mode (throughput, scaling, history, idle, latency, fairness) or --smoke")
    elif args.command == "throughput":
        throughput(args.jobs, args.kind, args.destinations, args.tenants, args.workers,
                   args.service_cpus, args.batch)
    elif args.command == "scaling":
        scaling(args.jobs, args.rounds)
    elif args.command == "history":
        history(args.rounds, args.jobs, args.keep)
    elif args.command == "idle":
        idle(args.destinations, args.tenants, args.seconds)
    elif args.command == "latency":
        latency(args.rate, args.seconds)
    else:
        fairness(args.seconds, args.flood_rate)


if __name__ == "__main__":
    main()
