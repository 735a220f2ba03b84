"""CPU per ingested event of two checkouts side by side: this one and another (an older commit).

    .venv/bin/python bench/ingest_pair.py --before ../wt-base [--rate 5000] [--seconds 30]
                                          [--destinations 1]
    .venv/bin/python bench/ingest_pair.py --smoke     # a few seconds, this checkout twice

On a machine shared with other work, CPU per event swings with whatever else runs (a busy
neighbour evicts caches and steals cycles), and runs taken one after the other compare two
different machines. Here both relayq-ingest servers run *at the same time*, each from its
own checkout (its own virtualenv, its own fresh database on the same Postgres), each fed the
same paced load by its own client process: 100-event requests (~330-byte payloads, a source
connected to `--destinations` destinations) at `--rate` events/s, serialised before the clock
starts. Both pay for the same neighbours, so the ratio of their CPU per event holds where
lone figures do not. The rate should leave both servers idle part of the time, so that
neither falls behind (the figures say if one did).

Prints, for each side, events/s acknowledged and CPU per event of the ingest process (with
its children, should it run workers) and of its Postgres backends, and the after/before
ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SERVER,
    add_source,
    cpu_seconds,
    cpu_since,
    drop_database,
    dsn_for,
    free_port,
    wait_ready,
)
from bench.ingest import BATCH, event
from relayq.v1 import ingest_pb2

ROOT = Path(__file__).resolve().parent.parent


def _empty_database() -> str:
    """A database with nothing in it: each side's server applies its own migrations."""
    name = f"relayq_pair_{os.urandom(4).hex()}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def _backends_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of Postgres backends by pid, leaving out any that has ended meanwhile."""
    used = {}
    for pid in pids:
        try:
            used[pid] = cpu_seconds(pid)
        except OSError:
            continue
    return used


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and every live descendant (workers, if the server runs any)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total


class Side:
    """One checkout's relayq-ingest with its own database and write key."""

    def __init__(self, label: str, checkout: Path, destinations: int = 1) -> None:
        self.label = label
        self.checkout = checkout
        self.name = _empty_database()
        self.port = free_port()
        python = checkout / ".venv" / "bin" / "python"
        env = {**os.environ, "RELAYQ_DATABASE_URL": dsn_for(self.name),
               "RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{self.port}",
               "RELAYQ_INGEST_METRICS_ADDRESS": "off", "RELAYQ_LOG_LEVEL": "warning",
               "RELAYQ_MAINTENANCE": "false", "RELAYQ_INGEST_WORKERS": "1"}
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [str(python), "-c", "import ingest_service.main as m; m.main()"],
            cwd=checkout, env=env)
        wait_ready(self.port, 60)
        with psycopg.connect(dsn_for(self.name), autocommit=True) as conn:
            self.write_key, *_ = add_source(
                conn, "bench", "web", {f"d{n}": ("webhook", "http://127.0.0.1:9/")
                                       for n in range(1, destinations + 1)})

    def backends(self) -> list[int]:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                                (self.name,)).fetchall()
        return [int(r[0]) for r in rows]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        finally:
            drop_database(self.name)


def paced_client(port: int, write_key: str, prefix: str, rate: float, seconds: float,
                 start_at: float, results: Any) -> None:
    """Requests of BATCH events at `rate` events/s, sent on schedule whether or not earlier
    ones were answered (as independent producers would)."""
    count = max(1, int(rate * seconds / BATCH))
    bodies = [ingest_pb2.IngestRequest(events=[event(prefix, n * BATCH + i)
                                               for i in range(BATCH)]).SerializeToString()
              for n in range(count)]

    async def run() -> tuple[int, int, float]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        await channel.channel_ready()
        call = channel.unary_unary("/relayq.v1.Ingest/Ingest",
                                   response_deserializer=ingest_pb2.IngestResponse.FromString)
        metadata = (("authorization", f"Bearer {write_key}"),)
        accepted = duplicates = 0

        async def one(body: bytes) -> None:
            nonlocal accepted, duplicates
            response = await call(body, metadata=metadata, timeout=120)
            accepted += response.accepted
            duplicates += response.duplicates

        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.monotonic()
        tasks = []
        for n, body in enumerate(bodies):
            await asyncio.sleep(max(0.0, begin + n * BATCH / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        finished = time.time()
        await channel.close()
        return accepted, duplicates, finished

    accepted, duplicates, finished = asyncio.run(run())
    results.put((prefix, accepted, duplicates, finished, count * BATCH))


def compare(before: Path, rate: float, seconds: float, destinations: int = 1) -> None:
    sides = [Side("before", before, destinations), Side("after", ROOT, destinations)]
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        start_at = time.time() + 3 + rate * seconds / 100_000  # time to serialise requests
        clients = [context.Process(target=paced_client, args=(
            side.port, side.write_key, side.label, rate, seconds, start_at, results))
            for side in sides]
        for client in clients:
            client.start()
        time.sleep(max(0.0, start_at - time.time()))
        server_before = [_tree_cpu(side.process.pid) for side in sides]
        postgres_before = [_backends_cpu(side.backends()) for side in sides]
        outcomes = {prefix: (accepted, duplicates, finished, expected)
                    for prefix, accepted, duplicates, finished, expected
                    in (results.get(timeout=seconds + 600) for _ in clients)}
        server = [_tree_cpu(s.process.pid) - c for s, c in zip(sides, server_before, strict=True)]
        # Backends opened during the run count whole; one that ended during it (a pool
        # replacing a connection) takes its CPU along: said below, not counted.
        postgres_after = [_backends_cpu(side.backends()) for side in sides]
        postgres = [cpu_since(b, a) for b, a in zip(postgres_before, postgres_after, strict=True)]
        for side, b, a in zip(sides, postgres_before, postgres_after, strict=True):
            if set(b) - set(a):
                print(f"{side.label}: {len(set(b) - set(a))} Postgres backend(s) ended during the"
                      " run; their CPU is not counted")
        for client in clients:
            client.join()
    finally:
        for side in sides:
            side.stop()
    per_event: list[tuple[float, float]] = []
    for side, server_cpu, postgres_cpu in zip(sides, server, postgres, strict=True):
        accepted, duplicates, finished, expected = outcomes[side.label]
        if accepted != expected:
            # Said, not fatal: the figures are per accepted event either way.
            print(f"{side.label}: {accepted:,} of {expected:,} events accepted,"
                  f" {duplicates:,} answered DUPLICATE")
        per_event.append((server_cpu / accepted * 1e6, postgres_cpu / accepted * 1e6))
        print(f"{side.label} ({side.checkout}): {accepted / (finished - start_at):,.0f}"
              f" events/s of {rate:,.0f} offered; CPU per event: ingest"
              f" {per_event[-1][0]:.1f} us, its Postgres backends {per_event[-1][1]:.1f} us")
    (ingest_before, pg_before), (ingest_after, pg_after) = per_event
    print(f"after / before, CPU per event: ingest {ingest_after / ingest_before:.2f},"
          f" Postgres {pg_after / pg_before:.2f},"
          f" both {(ingest_after + pg_after) / (ingest_before + pg_before):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path,
                        help="the other checkout (with its own .venv, `make install` there)")
    parser.add_argument("--rate", type=float, default=5000, help="events/s for each side")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--destinations", type=int, default=1,
                        help="destinations each side's source is connected to (default 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds, this checkout against itself")
    args = parser.parse_args()
    if args.smoke:
        args.before, args.rate, args.seconds = ROOT, 1000, 3
    if args.before is None:
        parser.error("--before CHECKOUT (or --smoke)")
    compare(args.before.resolve(), args.rate, args.seconds, args.destinations)


if __name__ == "__main__":
    main()
