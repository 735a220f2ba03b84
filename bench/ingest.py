"""Sustained ingest throughput through the gRPC server: raw stubs, the Producer, raw COPY.

    .venv/bin/python bench/ingest.py [--events 300000] [--processes 2] [--clients 4]
                                     [--destinations 1]
    .venv/bin/python bench/ingest.py --smoke          # a few seconds, every mode, tiny sizes

Fresh databases, each migrated, with one source connected to `--destinations` destinations
(what ingest writes does not depend on how many: each event once):

- raw: one psycopg connection COPYs the very rows ingest would write (the dedup key and the
  event's row in the log, documents built by ingest's own code) and commits every 100 events;
- raw stubs: a relayq-ingest process; client processes each run several gRPC clients, every
  client sending batches of 100 events (~330-byte JSON payloads) one after another, each
  waiting for its answer. Requests are serialised before the clock starts, so these figures
  measure the server and the database, not the load generator;
- producer: the same server fed by ONE Python process with ONE relayq.client.Producer,
  calling send() per event with the event's fields (the properties dicts are built before
  the clock, as an application would have them; ids, checks, serialisation, batching and
  answers are the library's work, on the clock).

Prints events/s for each, the client processes' CPU per event, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SERVER,
    add_source,
    cpu_seconds,
    cpu_since,
    create_database,
    drop_database,
    dsn_for,
    free_port,
    percentile,
    service_command,
    service_cpu,
    wait_ready,
)
from ingest_service.config import Limits
from ingest_service.validate import build_event
from jobsdb.keyspace import partition_of
from jobsdb.write_keys import SourceRoute
from relayq.v1 import ingest_pb2

BATCH = 100


def properties(i: int) -> dict[str, Any]:
    """A ~330-byte JSON object, varied enough not to compress to nothing."""
    return {
        "order_id": f"ord-{i:010d}", "checkout_id": secrets.token_hex(8),
        "revenue": round(i * 1.37 % 1000, 2), "currency": "EUR", "coupon": "SPRING",
        "products": [
            {"sku": f"sku-{i % 977:05d}", "name": "Merino wool sweater", "price": 89.9, "qty": 1},
            {"sku": f"sku-{i % 131:05d}", "name": "Linen trousers", "price": 59.0, "qty": 2},
        ],
        "campaign": {"source": "newsletter", "medium": "email", "name": "autumn-sale"},
    }


def payload(i: int) -> str:
    return orjson.dumps(properties(i)).decode()


def event(prefix: str, i: int) -> ingest_pb2.Event:
    return ingest_pb2.Event(message_id=f"{prefix}-{i}", user_id=f"user-{i % 10_000}",
                            type="track", event="Order Completed", payload_json=payload(i))


# --- databases ---------------------------------------------------------------------------

def prepared_database(destinations: int = 1) -> tuple[str, str, int, int, dict[str, int]]:
    """A migrated database with one source connected to `destinations` destinations.

    Returns (name, write key, tenant key, source key, {destination id: key}).
    """
    name = create_database()
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        write_key, tenant, source, keys = add_source(
            conn, "bench", "web", {f"d{n}": ("webhook", "http://127.0.0.1:9/")
                                   for n in range(1, destinations + 1)})
    return name, write_key, tenant, source, keys


def stored_bytes(name: str) -> int:
    """What the database takes on disk (tables, indexes, TOAST; not the WAL)."""
    with psycopg.connect(SERVER, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()
    return int(row[0]) if row else 0


# --- raw COPY baseline ---------------------------------------------------------------------

def _copy_escape(data: bytes) -> bytes:
    """COPY text format: backslash, tab, newline and carriage return must be escaped."""
    data = data.replace(b"\\", b"\\\\")
    return data.replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def raw_copy(events: int, destinations: int = 1) -> float:
    """The rows ingest writes (each event's dedup key and its one row in the log, whatever
    the destinations), by COPY, committed every BATCH events."""
    name, _, tenant, source, keys_by_id = prepared_database(destinations)
    try:
        route = SourceRoute(source_key=source, source_id="web", tenant_key=tenant,
                            tenant_id="bench", enabled=True, rate_per_second=0.0, rate_burst=0,
                            destinations=keys_by_id,
                            destination_keys=tuple(keys_by_id.values()))
        limits = Limits(1000, 64 * 1024, 16 << 20)
        now = "2026-11-25T10:00:00.000Z"
        chunks: list[tuple[bytes, bytes]] = []
        for start in range(0, events, BATCH):
            keys, rows = [], []
            for i in range(start, min(start + BATCH, events)):
                built = build_event(event("raw", i), route, limits, now)
                keys.append(b"%d\t%s\t1\n" % (source, built.message_id.encode()))
                rows.append(b"%d\t%d\t%d\t%d\t%s\t%s\t%s\n" % (
                    i + 1, source, tenant, partition_of(built.user_id, 64),
                    built.user_id.encode(), built.message_id.encode(),
                    _copy_escape(built.document.encode())))
            chunks.append((b"".join(keys), b"".join(rows)))
        with psycopg.connect(dsn_for(name)) as conn, conn.cursor() as cur:
            backend = conn.info.backend_pid
            cpu_before = cpu_seconds(backend)
            started = time.perf_counter()
            for keys_data, jobs_data in chunks:
                with cur.copy("COPY dedup_keys (source_key, message_id, generation) FROM STDIN"
                              ) as copy:
                    copy.write(keys_data)
                with cur.copy("COPY events (event_id, source_key, tenant_key,"
                              " ordering_partition, user_id, message_id, document) FROM STDIN"
                              ) as copy:
                    copy.write(jobs_data)
                conn.commit()
            elapsed = time.perf_counter() - started
            print(f"  raw COPY: its Postgres backend used"
                  f" {(cpu_seconds(backend) - cpu_before) / events * 1e6:.0f} us of CPU per event")
            return events / elapsed
    finally:
        drop_database(name)


# --- ingest through gRPC -----------------------------------------------------------------

def client_process(port: int, write_key: str, prefix: str, clients: int, batches: int,
                   start_at: float, results: Any,
                   make: Callable[[str, int], ingest_pb2.Event] = event) -> None:
    """Raw stubs: `clients` gRPC clients sending pre-serialised batches one after another,
    of events `make` makes (a module-level function: it travels to a spawned process)."""
    requests = [
        [ingest_pb2.IngestRequest(events=[make(f"{prefix}c{c}", b * BATCH + i)
                                          for i in range(BATCH)]).SerializeToString()
         for b in range(batches)]
        for c in range(clients)
    ]

    async def run() -> tuple[int, list[float]]:
        # A connection per client (gRPC would otherwise share one between the channels of a
        # process): workers sharing the port each get the connections the kernel gives them.
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                              options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in requests]
        metadata = (("authorization", f"Bearer {write_key}"),)
        latencies: list[float] = []

        async def one_client(channel: grpc.aio.Channel, mine: list[bytes]) -> int:
            call = channel.unary_unary("/relayq.v1.Ingest/Ingest",
                                       response_deserializer=ingest_pb2.IngestResponse.FromString)
            accepted = 0
            for body in mine:
                t0 = time.perf_counter()
                response = await call(body, metadata=metadata, timeout=60)
                latencies.append(time.perf_counter() - t0)
                accepted += response.accepted
            return accepted

        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        counts = await asyncio.gather(*(one_client(c, r) for c, r in zip(channels, requests,
                                                                           strict=True)))
        for channel in channels:
            await channel.close()
        return sum(counts), latencies

    cpu_before = time.process_time()
    accepted, latencies = asyncio.run(run())
    results.put((accepted, time.time(), latencies, time.process_time() - cpu_before))


def producer_process(port: int, write_key: str, events: int, batch_events: int,
                     in_flight: int, start_at: float, results: Any) -> None:
    """One Producer, send() per event from this process's main thread, then flush."""
    from relayq.client import Producer

    # 1,024 dicts used in turn: an application makes each event's dict and drops it; holding
    # a dict per event for the whole run instead would make Python's cyclic GC walk hundreds
    # of thousands of objects the library never made (it measured as a third of the CPU).
    data = [properties(i) for i in range(1024)]
    producer = Producer(address=f"127.0.0.1:{port}", write_key=write_key,
                        batch_events=batch_events, in_flight=in_flight)
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = time.process_time()
    for i in range(events):
        producer.send(user_id=f"user-{i % 10_000}", type="track", event="Order Completed",
                      properties=data[i % 1024])
    producer.flush()
    finished = time.time()
    cpu = time.process_time() - cpu_before
    counters = producer.counters
    producer.close()
    print(f"  producer: {counters.batches} requests, {events / max(1, counters.batches):.0f}"
          f" events each on average; {counters.retried} events retried")
    results.put((counters.accepted, finished, [], cpu))


def through_ingest(events: int, load: str, processes: int, clients: int,
                   producer_batch: int, producer_in_flight: int, profile: str | None = None,
                   workers: str = "1", cpus: str | None = None, destinations: int = 1
                   ) -> tuple[float, list[float], str]:
    """events/s through relayq-ingest (RELAYQ_INGEST_WORKERS=`workers`, on `cpus` when given)
    fed by raw stubs or by one Producer, its source connected to `destinations`."""
    name, write_key, *_ = prepared_database(destinations)
    size_before = stored_bytes(name)
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "RELAYQ_DATABASE_URL": dsn_for(name),
           "RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{port}",
           "RELAYQ_INGEST_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
           "RELAYQ_LOG_LEVEL": "warning", "RELAYQ_MAINTENANCE": "false",
           "RELAYQ_INGEST_WORKERS": workers}
    command = service_command("ingest_service.main", cpus)
    if profile:  # py-spy (pip install py-spy) samples the server; collapsed stacks to a file
        command = ["py-spy", "record", "--format", "raw", "--rate", "200", "-o", profile,
                   "--", *command]
    proc = subprocess.Popen(command, env=env)
    try:
        wait_ready(port)
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        if load == "producer":
            expected = events
            start_at = time.time() + 3  # time to build the properties and connect
            workers = [context.Process(target=producer_process, args=(
                port, write_key, events, producer_batch, producer_in_flight, start_at, results))]
        else:
            batches = events // BATCH // (processes * clients)
            expected = batches * BATCH * processes * clients
            start_at = time.time() + 3 + 0.5 * processes  # time for every client to build
            workers = [context.Process(target=client_process,
                                       args=(port, write_key, f"p{p}", clients, batches,
                                             start_at, results))
                       for p in range(processes)]
        backends = _backend_pids(name)
        server_cpu_before = service_cpu(proc.pid)
        postgres_cpu_before = sum(cpu_seconds(p) for p in backends)
        for w in workers:
            w.start()
        outcomes = [results.get(timeout=600) for _ in workers]
        for w in workers:
            w.join()
        accepted = sum(o[0] for o in outcomes)
        finished = max(o[1] for o in outcomes)
        latencies = [x for o in outcomes for x in o[2]]
        client_cpu = sum(o[3] for o in outcomes)
        flushes = _flush_stats(metrics_port)
        server_cpu_now = service_cpu(proc.pid)
        server_cpu = cpu_since(server_cpu_before, server_cpu_now)
        postgres_cpu = sum(cpu_seconds(p) for p in backends) - postgres_cpu_before
        per_event = 1e6 / max(1, accepted)
        flushes += (f"\n  CPU per event: clients {client_cpu * per_event:.0f} us,"
                    f" ingest {server_cpu * per_event:.0f} us"
                    f"{_split(server_cpu_before, server_cpu_now, proc.pid)},"
                    f" its Postgres backends {postgres_cpu * per_event:.0f} us")
        if accepted != expected:
            raise SystemExit(f"accepted {accepted} of {expected} events")
        stored = (stored_bytes(name) - size_before) / max(1, accepted) * 10_000
        flushes += f"\n  stored: {stored / 1e6:.1f} MB per 10,000 events"
        return accepted / (finished - start_at), latencies, flushes
    finally:
        proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        proc.wait(60)
        drop_database(name)


def _split(before: dict[int, float], now: dict[int, float], supervisor: int) -> str:
    """How the CPU was spread over the workers, when there are several."""
    workers = [pid for pid in now if pid != supervisor]
    if len(workers) < 2:
        return ""
    used = [now[pid] - before.get(pid, 0.0) for pid in workers]
    return " (workers " + " + ".join(f"{u / max(1e-9, sum(used)):.0%}" for u in used) + ")"


def _backend_pids(database: str) -> list[int]:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (database,)).fetchall()
    return [int(r[0]) for r in rows]


def _flush_stats(metrics_port: int) -> str:
    """Group commits as the server counted them: how many, how large, how long."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("relayq_ingest_flush_jobs_count", "relayq_ingest_flush_jobs_sum",
                     "relayq_ingest_flush_seconds_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    count = values.get("relayq_ingest_flush_jobs_count", 0) or 1
    jobs = values.get("relayq_ingest_flush_jobs_sum", 0) / count
    millis = values.get("relayq_ingest_flush_seconds_sum", 0) / count * 1000
    return f"{count:.0f} group commits, {jobs:.0f} jobs and {millis:.1f} ms each on average"


def _shape(args: argparse.Namespace) -> str:
    where = f" on CPUs {args.service_cpus}" if args.service_cpus else ""
    return f" ({args.workers} worker{'s' if args.workers != '1' else ''}{where})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--processes", type=int, default=2, help="raw stub client processes")
    parser.add_argument("--clients", type=int, default=4, help="gRPC clients per process")
    parser.add_argument("--load", choices=("stubs", "producer", "both"), default="both",
                        help="what feeds ingest: raw stubs, one Producer, or each in turn")
    parser.add_argument("--producer-batch", type=int, default=500,
                        help="the Producer's batch_events (default 500)")
    parser.add_argument("--producer-in-flight", type=int, default=4,
                        help="the Producer's in_flight lanes (default 4)")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the ingest server with py-spy (collapsed stacks) into FILE")
    parser.add_argument("--skip-raw", action="store_true", help="no raw COPY baseline")
    parser.add_argument("--destinations", type=int, default=1,
                        help="destinations the source is connected to (default 1)")
    parser.add_argument("--workers", default="1",
                        help="RELAYQ_INGEST_WORKERS for the server (default 1; 'auto': one per"
                             " CPU it may use)")
    parser.add_argument("--service-cpus", metavar="LIST",
                        help="run the server under `taskset -c LIST` (e.g. 0 or 0,1); the"
                             " clients and Postgres still run anywhere")
    parser.add_argument("--scaling", type=int, metavar="ROUNDS",
                        help="instead: raw stubs into 1 worker on CPU 0, 1 worker on CPUs 0,1"
                             " and 2 workers on CPUs 0,1, in turn, ROUNDS times")
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds: 4,000 events, every mode (checks the script runs)")
    args = parser.parse_args()
    if args.smoke:
        args.events = 4_000
    if args.scaling:
        scaling(args.events, args.processes, args.clients, args.scaling)
        return

    raw = float("nan") if args.skip_raw else raw_copy(args.events, args.destinations)
    print(f"raw COPY, 1 connection, commit per {BATCH} events: {raw:,.0f} events/s")
    rates = {}
    for load in (("stubs", "producer") if args.load == "both" else (args.load,)):
        rate, latencies, flushes = through_ingest(
            args.events, load, args.processes, args.clients, args.producer_batch,
            args.producer_in_flight, args.profile, args.workers, args.service_cpus,
            args.destinations)
        rates[load] = rate
        if load == "stubs":
            p50 = statistics.median(latencies) * 1000
            p99 = percentile(latencies, 0.99) * 1000
            print(f"relayq-ingest{_shape(args)}, {args.destinations} destination(s),"
                  f" {args.processes}x{args.clients} raw stub clients, batches of"
                  f" {BATCH}: {rate:,.0f} events/s (request latency p50 {p50:.1f} ms,"
                  f" p99 {p99:.1f} ms)")
        else:
            print(f"relayq-ingest{_shape(args)}, 1 process with 1 Producer (batch"
                  f" {args.producer_batch},"
                  f" {args.producer_in_flight} in flight): {rate:,.0f} events/s")
        print(f"  {flushes}")
        print(f"ratio ingest/raw: {rate / raw:.2f}")
    if len(rates) == 2:
        print(f"ratio producer/raw stubs: {rates['producer'] / rates['stubs']:.2f}")
    if args.smoke:  # the workers' path too
        scaling(args.events, args.processes, args.clients, 1, SCALING[-1:])


# (RELAYQ_INGEST_WORKERS, CPUs the service may use): one core, then two, first for one process.
SCALING = (("1", "0"), ("1", "0,1"), ("2", "0,1"))


def scaling(events: int, processes: int, clients: int, rounds: int,
            shapes: tuple[tuple[str, str], ...] = SCALING) -> None:
    """The same load into each shape in turn, `rounds` times: one core to two."""
    rates: dict[tuple[str, str], list[float]] = {shape: [] for shape in shapes}
    for round_ in range(1, rounds + 1):
        for workers, cpus in shapes:
            rate, latencies, flushes = through_ingest(events, "stubs", processes, clients, 0, 0,
                                                      workers=workers, cpus=cpus)
            rates[workers, cpus].append(rate)
            print(f"round {round_}: {workers} worker(s) on CPUs {cpus}: {rate:,.0f} events/s"
                  f" (p99 {percentile(latencies, 0.99) * 1000:.0f} ms); {flushes.strip()}")
    for (workers, cpus), seen in rates.items():
        print(f"{workers} worker(s) on CPUs {cpus}: {min(seen):,.0f}-{max(seen):,.0f} events/s")


if __name__ == "__main__":
    main()
