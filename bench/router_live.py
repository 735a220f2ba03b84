"""Router benchmarks with live traffic through ingest: end-to-end latency, and tenant
isolation under a flood (bench/router.py says what each measures)."""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_source,
    create_database,
    drop_database,
    dsn_for,
    free_port,
    percentile,
    spawn,
    wait_ready,
)
from bench.ingest import payload
from bench.router_common import QUIET, Sink, stop
from jobsdb.ingest import NewEvent, store_events
from relayq.v1 import ingest_pb2


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


