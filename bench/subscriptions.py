"""What connection filters cost ingest: events/s and ingest CPU per event, filtered or not.

    .venv/bin/python bench/subscriptions.py [--events 20000] [--rounds 3] [--smoke]

One relayq-ingest process and one database with four sources, each fed in turn (alternating,
the order rotated every round, so a slower minute of a shared machine hits every one):

- plain: ten connections without filters (ten jobs per event);
- filtered: the same ten connections with ten different filters that all match every event
  (still ten jobs per event), reading the event name, nested properties, LIKE, IN, IS NULL:
  what evaluating filters costs, the figure the target (at most 10% slower) is about;
- one-in-ten: ten connections whose filters each take a tenth of the events (one job per
  event, nine events kept out per event and counted): what subscriptions save;
- single: one connection without a filter (one job per event), the same writes as one-in-ten
  without any filtering.

Client processes each run several gRPC clients sending batches of 100 events (~350 bytes of
JSON) one after another; requests are built before the clock starts. Prints events/s and the
ingest process's CPU per event for each source and round, then the medians and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SERVER,
    add_source,
    cpu_seconds,
    create_database,
    drop_database,
    dsn_for,
    free_port,
    spawn,
    wait_ready,
)
from bench.ingest import client_process
from relayq.v1 import ingest_pb2

BATCH = 100

# Ten filters that every event below matches, each reading something else.
MATCH_ALL = [
    "event = 'Order Completed'",
    "event IN ('Order Completed', 'Order Refunded', 'Checkout Started')",
    "properties.revenue >= 0",
    "properties.currency = 'EUR' AND properties.revenue < 1000",
    "properties.products.0.sku LIKE 'sku-%'",
    "type = 'track' AND user_id IS NOT NULL",
    "properties.campaign.medium IN ('email', 'social')",
    "NOT properties.coupon IS NULL",
    "properties.products.1.qty > 1 OR properties.revenue > 500",
    "properties.campaign.source LIKE '%letter'",
]
# Ten filters each taking a tenth of the events.
ONE_IN_TEN = [f"properties.shard = {k}" for k in range(10)]

SOURCES: dict[str, tuple[int, list[str]]] = {
    # source -> (connections, their filters)
    "plain": (10, []),
    "filtered": (10, MATCH_ALL),
    "one-in-ten": (10, ONE_IN_TEN),
    "single": (1, []),
}


def payload(i: int) -> str:
    """A ~350-byte JSON object, varied enough not to compress to nothing."""
    return orjson.dumps({
        "order_id": f"ord-{i:010d}", "checkout_id": secrets.token_hex(8),
        "revenue": round(i * 1.37 % 1000, 2), "currency": "EUR", "coupon": "SPRING",
        "shard": i % 10,
        "products": [
            {"sku": f"sku-{i % 977:05d}", "name": "Merino wool sweater", "price": 89.9, "qty": 1},
            {"sku": f"sku-{i % 131:05d}", "name": "Linen trousers", "price": 59.0, "qty": 2},
        ],
        "campaign": {"source": "newsletter", "medium": "email", "name": "autumn-sale"},
    }).decode()


def event(prefix: str, i: int) -> ingest_pb2.Event:
    return ingest_pb2.Event(message_id=f"{prefix}-{i}", user_id=f"user-{i % 10_000}",
                            type="track", event="Order Completed", payload_json=payload(i))


def prepare(name: str) -> dict[str, str]:
    """The four sources, their connections and filters; returns source -> write key."""
    keys = {}
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        for source, (count, filters) in SOURCES.items():
            destinations = {f"{source}-d{k}": ("webhook", "http://127.0.0.1:9/")
                            for k in range(count)}
            write_key, _, source_key, made = add_source(conn, "bench", source, destinations)
            for k, text in enumerate(filters):
                conn.execute("UPDATE connections SET event_filter = %s"
                             " WHERE source_key = %s AND destination_key = %s",
                             (text, source_key, made[f"{source}-d{k}"]))
            keys[source] = write_key
    return keys


def backends(database: str) -> list[int]:
    """The Postgres backends serving the database (ingest's pool and maintenance)."""
    with psycopg.connect(SERVER, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (database,)).fetchall()
    return [int(r[0]) for r in rows]


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):  # a backend that ended meanwhile
            total += cpu_seconds(pid)
    return total


def phase(port: int, ingest_pid: int, database: str, write_key: str, prefix: str, events: int,
          processes: int, clients: int) -> tuple[float, float, float]:
    """Send `events` from one source; (events/s, ingest and Postgres CPU µs per event)."""
    batches = max(1, events // BATCH // (processes * clients))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 2 + 0.5 * processes
    workers = [context.Process(target=client_process,
                               args=(port, write_key, f"{prefix}p{p}", clients, batches,
                                     start_at, results, event))
               for p in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, start_at - time.time()))
    pids = backends(database)
    cpu_before, postgres_before = cpu_seconds(ingest_pid), _cpu(pids)
    outcomes = [results.get(timeout=900) for _ in workers]
    cpu, postgres = cpu_seconds(ingest_pid) - cpu_before, _cpu(pids) - postgres_before
    for worker in workers:
        worker.join()
    accepted = sum(o[0] for o in outcomes)
    expected = batches * BATCH * processes * clients
    if accepted != expected:
        raise SystemExit(f"accepted {accepted} of {expected} events")
    return (accepted / (max(o[1] for o in outcomes) - start_at), cpu / accepted * 1e6,
            postgres / accepted * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per source and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--clients", type=int, default=4, help="gRPC clients per process")
    parser.add_argument("--only", default=",".join(SOURCES),
                        help="the sources to feed, comma-separated (to profile one)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: 1 round, 2,000")
    args = parser.parse_args()
    chosen = args.only.split(",")
    if args.smoke:
        args.events, args.rounds, args.processes, args.clients = 2_000, 1, 1, 2

    name = create_database()
    port = free_port()
    process = spawn("ingest_service.main", {
        "RELAYQ_DATABASE_URL": dsn_for(name), "RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{port}",
        "RELAYQ_INGEST_METRICS_ADDRESS": "off"})
    figures: dict[str, list[tuple[float, float, float]]] = {
        source: [] for source in SOURCES if source in chosen}
    try:
        keys = prepare(name)
        wait_ready(port)
        order = [source for source in SOURCES if source in chosen]
        for round_ in range(args.rounds):
            for source in order:
                figure = phase(port, process.pid, name, keys[source], f"r{round_}",
                               args.events, args.processes, args.clients)
                figures[source].append(figure)
                print(f"round {round_ + 1} {source:>10}: {figure[0]:8,.0f} events/s, CPU per"
                      f" event: ingest {figure[1]:5.1f} µs, Postgres {figure[2]:5.1f} µs",
                      flush=True)
            order = order[1:] + order[:1]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        drop_database(name)

    print(f"\n{args.rounds} rounds of {args.events:,} events per source,"
          f" {args.processes}x{args.clients} clients, batches of {BATCH}; medians (spread):")
    for source, values in figures.items():
        rates, cpus, postgres = ([v[i] for v in values] for i in range(3))
        print(f"  {source:>10}: {statistics.median(rates):8,.0f} events/s"
              f" ({min(rates):,.0f}-{max(rates):,.0f}); CPU per event: ingest"
              f" {statistics.median(cpus):.1f} µs ({min(cpus):.1f}-{max(cpus):.1f}), Postgres"
              f" {statistics.median(postgres):.1f} µs ({min(postgres):.1f}-{max(postgres):.1f})")
    print("ratios, per round (paired: the two ran minutes apart at most), then their median:")
    for label, a, b in (("filtered / plain", "filtered", "plain"),
                        ("one-in-ten / single", "one-in-ten", "single"),
                        ("one-in-ten / plain", "one-in-ten", "plain")):
        if a not in figures or b not in figures:
            continue
        rates = [x[0] / y[0] for x, y in zip(figures[a], figures[b], strict=True)]
        cpus = [x[1] / y[1] for x, y in zip(figures[a], figures[b], strict=True)]
        print(f"  {label:>19}: events/s {' '.join(f'{r:.2f}' for r in rates)}"
              f" -> x{statistics.median(rates):.2f}; ingest CPU per event"
              f" {' '.join(f'{c:.2f}' for c in cpus)} -> x{statistics.median(cpus):.2f}")


if __name__ == "__main__":
    main()
