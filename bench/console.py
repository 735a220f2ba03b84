"""The operator console on 10,000 destinations: does it cost the admin API its latency, and
how fast does the overview answer?

    .venv/bin/python -m bench.console [--destinations 10000] [--events 20000] [--viewers 5]
                                      [--calls 200] [--seconds 20]

Fills a fresh database with 10 tenants of 1,000 destinations each (a tenant's first ten
connected to its one source, the rest configured but idle), ingests --events events through
relayq-ingest (ten jobs each, left pending: no router runs, so the backlog is real), then runs
relayq-admin with its console as its own process and measures, from this process:

1. admin gRPC calls (a selective ListJobs, GetJob, PeekJobs, GetStats of one destination, a
   page of ListDestinations, GetStats of everything), median and p99 over --calls calls, with
   no console open;
2. the same while --viewers signed-in consoles poll the overview as htmx does (every two
   seconds, each sorted differently, one searching); 1 and 2 alternate in four rounds, so
   the machine's other load weighs on both alike;
3. the overview page's answer time, sorted, searched and paged (a scope's very first viewer
   waits for one GetStats of every destination instead, timed in the first table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    add_source,
    create_database,
    drop_database,
    dsn_for,
    percentile,
    spawn,
    wait_ready,
)
from relayq.ports import free_port
from relayq.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2, ingest_pb2_grpc

TOKEN = "bench-operator-token-0123456789"
TENANTS = 10
CONNECTED = 10
# How often the console's overview refreshes itself (overview_rows.html, hx-trigger).
POLL_SECONDS = 2.0
SORTS = ["pending", "oldest", "failed", "destination", "delivered"]
# Rounds of calls without and with consoles open, alternating.
ROUNDS = 4


def fill(name: str, destinations: int) -> list[str]:
    """Tenants, sources and destinations; returns the sources' write keys."""
    per_tenant = destinations // TENANTS
    keys = []
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        for t in range(TENANTS):
            tenant = f"tenant-{t:02d}"
            connected = {f"{tenant}-d{i:04d}": ("webhook", "http://127.0.0.1:9/")
                         for i in range(CONNECTED)}
            write_key, tenant_key, _, _ = add_source(conn, tenant, f"{tenant}-web", connected)
            keys.append(write_key)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO destinations (id, tenant_key, type, endpoint)"
                    " VALUES (%s, %s, 'webhook', 'http://127.0.0.1:9/')",
                    [(f"{tenant}-d{i:04d}", tenant_key) for i in range(CONNECTED, per_tenant)])
        conn.execute("VACUUM (ANALYZE) destinations")
    return keys


def ingest(port: int, keys: list[str], events: int) -> None:
    started = time.perf_counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        per_source = events // len(keys)
        for s, key in enumerate(keys):
            for start in range(0, per_source, 500):
                stub.Ingest(ingest_pb2.IngestRequest(events=[
                    ingest_pb2.Event(message_id=f"m{s}-{i}", user_id=f"user-{i % 500}",
                                     type="track", event="Order Completed",
                                     payload_json='{"n": 1}')
                    for i in range(start, min(per_source, start + 500))]),
                    metadata=(("authorization", f"Bearer {key}"),), timeout=60)
    print(f"ingested {events:,} events ({events * CONNECTED:,} jobs, left pending) in"
          f" {time.perf_counter() - started:.1f} s")


def grpc_calls(stub: admin_pb2_grpc.AdminStub) -> list[tuple[str, Callable[[], Any]]]:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    job = stub.ListJobs(admin_pb2.ListJobsRequest(filter="destination = 'tenant-03-d0004'",
                                                  page_size=1), metadata=metadata).jobs[0]
    return [
        ("ListJobs: one user's jobs at one destination",
         lambda: stub.ListJobs(admin_pb2.ListJobsRequest(
             filter="destination = 'tenant-03-d0004' AND user_id = 'user-42'"),
             metadata=metadata)),
        ("GetJob", lambda: stub.GetJob(admin_pb2.GetJobRequest(job_id=job.job_id),
                                       metadata=metadata)),
        ("PeekJobs: next 20 of one destination",
         lambda: stub.PeekJobs(admin_pb2.PeekJobsRequest(destination_id="tenant-03-d0004"),
                               metadata=metadata)),
        ("GetStats: one destination",
         lambda: stub.GetStats(admin_pb2.GetStatsRequest(destination_id="tenant-03-d0004"),
                               metadata=metadata)),
        ("ListDestinations: a page of 100",
         lambda: stub.ListDestinations(admin_pb2.ListDestinationsRequest(page_size=100),
                                       metadata=metadata)),
        ("GetStats: everything (what a console's first view waits for)",
         lambda: stub.GetStats(admin_pb2.GetStatsRequest(), metadata=metadata)),
    ]


def time_calls(calls: list[tuple[str, Callable[[], Any]]], n: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {}
    for label, call in calls:
        for _ in range(5):
            call()
        times = []
        for _ in range(n):
            began = time.perf_counter()
            call()
            times.append((time.perf_counter() - began) * 1000)
        timings[label] = times
    return timings


async def signed_in(session: aiohttp.ClientSession, base: str) -> None:
    """Sign in as a browser does: the form's CSRF cookie, then the token."""
    async with session.get(f"{base}/sign-in") as page:
        text = await page.text()
    csrf = text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    async with session.post(f"{base}/sign-in", data={"csrf": csrf, "token": TOKEN},
                            allow_redirects=False) as answer:
        assert answer.status == 303, answer.status


async def viewer(base: str, index: int, stop: asyncio.Event, times: list[float]) -> None:
    """One open console: the overview's live rows every two seconds, as htmx asks for them."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await signed_in(session, base)
        query = f"?sort={SORTS[index % len(SORTS)]}&dir=desc"
        if index == 1:
            query += "&q=tenant-07"
        polls = 0
        while not stop.is_set():
            began = time.perf_counter()
            async with session.get(f"{base}/overview/rows{query}",
                                   headers={"HX-Request": "true"}) as answer:
                await answer.read()
                assert answer.status == 200, answer.status
            if polls:  # the first waits for the scope's first figures (GetStats: everything)
                times.append((time.perf_counter() - began) * 1000)
            polls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_SECONDS)


async def overview_latency(base: str, samples: int) -> list[float]:
    """Answer times of the overview page, sorted, searched and paged, its figures refreshed
    behind the answers as they age. (A scope's first viewer waits for one GetStats of every
    destination instead: the gRPC table's "GetStats: everything", plus the same page.)"""
    times = []
    pages = ["/?sort=pending&dir=desc", "/?q=d000&sort=oldest", "/?sort=destination&page=150",
             "/?sort=failed&dir=desc&page=3", "/"]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await signed_in(session, base)
        for i in range(samples + 1):
            for page in pages:
                began = time.perf_counter()
                async with session.get(base + page) as answer:
                    body = await answer.read()
                    assert answer.status == 200, answer.status
                    assert b"tenant-0" in body
                if i:  # the first round warms plans and templates
                    times.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(POLL_SECONDS / 4)
    return times


def row(label: str, times: list[float]) -> str:
    return (f"{label:<58} {statistics.median(times):>9.1f} {percentile(times, 0.99):>9.1f}"
            f" {len(times):>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--destinations", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--viewers", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="the least time consoles stay open in each of the rounds")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds: 1,000 destinations, 2,000 events, 20 calls")
    args = parser.parse_args()
    if args.smoke:
        args.destinations, args.events, args.calls, args.seconds, args.samples = \
            1_000, 2_000, 20, 2.0, 3
    name = create_database()
    processes = []
    try:
        keys = fill(name, args.destinations)
        ports = {"ingest": free_port(), "admin": free_port(), "console": free_port()}
        env = {"RELAYQ_DATABASE_URL": dsn_for(name), "RELAYQ_ADMIN_TOKEN": TOKEN,
               "RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{ports['ingest']}",
               "RELAYQ_ADMIN_ADDRESS": f"127.0.0.1:{ports['admin']}",
               "RELAYQ_ADMIN_CONSOLE_ADDRESS": f"127.0.0.1:{ports['console']}",
               "RELAYQ_INGEST_METRICS_ADDRESS": "off", "RELAYQ_ADMIN_METRICS_ADDRESS": "off",
               "RELAYQ_MAINTENANCE": "false"}
        processes.append(spawn("ingest_service.main", env))
        processes.append(spawn("admin_service.main", env))
        wait_ready(ports["ingest"])
        wait_ready(ports["admin"])
        ingest(ports["ingest"], keys, args.events)
        processes[0].terminate()
        base = f"http://127.0.0.1:{ports['console']}"
        alone: dict[str, list[float]] = {}
        viewed: dict[str, list[float]] = {}
        polls: list[float] = []
        with grpc.insecure_channel(f"127.0.0.1:{ports['admin']}") as channel:
            calls = grpc_calls(admin_pb2_grpc.AdminStub(channel))
            # Alternating rounds, so that whatever else the machine does meanwhile weighs on
            # both sides alike.
            for _ in range(ROUNDS):
                for label, times in time_calls(calls, args.calls // ROUNDS).items():
                    alone.setdefault(label, []).extend(times)
                round_viewed, round_polls = asyncio.run(with_viewers(base, args, calls))
                for label, times in round_viewed.items():
                    viewed.setdefault(label, []).extend(times)
                polls += round_polls
        views = asyncio.run(overview_latency(base, args.samples))
        print(f"\n{args.destinations:,} destinations, {args.events * CONNECTED:,} pending jobs;"
              f" {args.viewers} consoles polling every {POLL_SECONDS:g} s in the second part")
        print(f"{'admin gRPC call (ms)':<58} {'median':>9} {'p99':>9} {'calls':>6}")
        for label in alone:
            print(row(label, alone[label]))
            print(row(f"  ... with {args.viewers} consoles open", viewed[label]))
        print(f"\n{'console (ms)':<58} {'median':>9} {'p99':>9} {'calls':>6}")
        print(row("overview rows, polled by the open consoles", polls))
        print(row("overview page, sorted, searched and paged", views))
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
        drop_database(name)


async def with_viewers(base: str, args: argparse.Namespace,
                       calls: list[tuple[str, Callable[[], Any]]]
                       ) -> tuple[dict[str, list[float]], list[float]]:
    """The gRPC calls timed (in a thread) while the consoles poll (on this loop)."""
    stop = asyncio.Event()
    polls: list[float] = []
    tasks = [asyncio.create_task(viewer(base, i, stop, polls)) for i in range(args.viewers)]
    await asyncio.sleep(POLL_SECONDS)  # every console open and polling
    began = time.monotonic()
    result = await asyncio.to_thread(time_calls, calls, args.calls // ROUNDS)
    await asyncio.sleep(max(0.0, args.seconds - (time.monotonic() - began)))
    stop.set()
    await asyncio.gather(*tasks)
    return result, polls


if __name__ == "__main__":
    main()
