"""Replays (issue 18): a replay of a million events against the router's normal delivery rate,
while another destination's live traffic flows.

    .venv/bin/python bench/replay.py [--events 1000000] [--live-rate 500] [--baseline-seconds 20]
                                     [--router-env RELAYQ_ROUTER_LOG_WINDOW=5000 ...]
    .venv/bin/python bench/replay.py --smoke      # 5,000 events, about 30 s: checks it runs

A fresh database with one tenant: source `a` connected to destination `d1`, source `b` to
`d2`, each destination a gRPC sink process of its own (bench/sink.py, answering at once).
--events events of `a` (10,000 users, ~330-byte documents) are written straight into the log
(INSERT ... SELECT from generate_series, as bench/admin.py fills it: ingest would take minutes
for a million). Then relayq-router, relayq-ingest and relayq-admin start (one process each),
and in turn:

1. normal: `d1` (paused while the router started) is resumed and reads the log from its
   start; the clock runs from the resume until every success is counted in Postgres
   (delivery_counts, which the router writes with the delivery's record);
2. baseline: `b` sends --live-rate events/s through ingest (batches of 10) for
   --baseline-seconds, nothing else going on;
3. replay: `b` keeps sending at that rate while ReplayEvents(a -> d1, every event, reason
   "bench") is called; the clock runs from the call until every replayed success is counted
   and GetReplay says done with nothing pending.

Printed: the normal and replay rates and their ratio (issue 18's target: at least 0.5), also
as the sink saw them; when the replay worker had written every row, and the delivery rate
while it wrote and after; `b`'s send -> sink p50/p99 alone and during the replay; the
router's and its Postgres backends' CPU per event in both phases (the replay's including the
live traffic's, whose cost alone the baseline gives); what the router did in each phase (its
/metrics: log reads, row pickups, requests, outcome transactions, event loop lag); how often
the connections' version was bumped during the replay; what the database's backends were
doing (pg_stat_activity sampled every 100 ms: statement, wait, and whom a lock waits for);
and how long GetReplay took (polled every 5 s: it counts the replay's rows). The normal phase
has no live traffic: the replay is measured against the harder baseline. --live-rate 0: the
replay alone.
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
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SAMPLE_DOCUMENT,
    add_source,
    cpu_seconds,
    cpu_since,
    create_database,
    drop_database,
    dsn_for,
    free_port,
    percentile,
    service_cpu,
    spawn,
    wait_ready,
)
from bench.ingest import payload
from bench.router_backlog import _backends, _wait_split
from bench.router_common import QUIET, Sink, stop
from jobsdb import partitions
from relayq.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2

TOKEN = "bench-operator-token-0123456789"
USERS = 10_000
STEP = 100_000

# Source `a`'s events in the order ingest would number them, each in its user's ordering
# partition, committed a step at a time.
EVENTS = f"""
INSERT INTO events (event_id, source_key, tenant_key, ordering_partition, user_id, message_id,
                    document)
SELECT nextval('events_event_id_seq'), %(source_key)s, %(tenant_key)s,
       ordering_partition_of('user-' || (i %% %(users)s), 64), 'user-' || (i %% %(users)s),
       'msg-' || i,
       {SAMPLE_DOCUMENT}
FROM generate_series(%(start)s, %(stop)s - 1) AS i
"""


@dataclass
class Live:
    """Source `b`'s traffic: `rate` events/s through ingest until stopped; send times by
    message id."""

    port: int
    write_key: str
    rate: float
    prefix: str
    sent: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        if self.rate <= 0:
            return  # --live-rate 0: no live traffic
        self._thread = threading.Thread(target=lambda: asyncio.run(self._send()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    async def _send(self, batch: int = 10) -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        call = channel.unary_unary(
            "/relayq.v1.Ingest/Ingest",
            request_serializer=ingest_pb2.IngestRequest.SerializeToString,
            response_deserializer=ingest_pb2.IngestResponse.FromString)
        metadata = (("authorization", f"Bearer {self.write_key}"),)
        body = payload(3)
        tasks: list[asyncio.Task[None]] = []

        async def one(n: int) -> None:
            ids = [f"{self.prefix}-{n}-{i}" for i in range(batch)]
            request = ingest_pb2.IngestRequest(events=[
                ingest_pb2.Event(message_id=m, user_id=f"user-{random.randrange(USERS)}",
                                 type="track", event="Live", payload_json=body) for m in ids])
            start = time.time()
            try:
                await call(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                self.failed += batch
                self.error = self.error or f"{exc.code().name}: {exc.details()}"
                return
            for m in ids:
                self.sent[m] = start

        interval = batch / self.rate
        begin = time.monotonic()
        n = 0
        while not self._stop.is_set():
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(max(0.0, begin + n * interval - time.monotonic()))
        await asyncio.gather(*tasks)
        await channel.close(None)


class Counts:
    """Successes counted for a destination (delivery_counts: cheap to read, unlike jobs)."""

    def __init__(self, name: str, destination_key: int) -> None:
        self.conn = psycopg.connect(dsn_for(name), autocommit=True)
        self.destination_key = destination_key

    def succeeded(self) -> int:
        row = self.conn.execute("SELECT coalesce(sum(succeeded), 0) FROM delivery_counts"
                                " WHERE destination_key = %s", (self.destination_key,)
                                ).fetchone()
        return int(row[0]) if row else 0

    def config_version(self) -> int:
        """The connections' version (relayq_config_version): a bump makes routers reload
        their configuration before they hand out what they read from the log."""
        row = self.conn.execute("SELECT version FROM relayq_config_version").fetchone()
        return int(row[0]) if row else 0

    def wait(self, at_least: int, within: float) -> float:
        """Until `at_least` successes are counted; returns when that was seen (time.time)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.succeeded() >= at_least:
                return time.time()
            time.sleep(0.05)
        raise SystemExit(f"only {self.succeeded():,} of {at_least:,} successes counted in time")


def load(name: str, source_key: int, tenant_key: int, events: int) -> float:
    """`events` events of source `a` straight into the log; returns the seconds it took."""
    started = time.perf_counter()

    async def ensure() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            await partitions.ensure(c, upto_event_id=events + 1)

    asyncio.run(ensure())
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        for start in range(1, events + 1, STEP):
            conn.execute(EVENTS, {"start": start, "stop": min(events + 1, start + STEP),
                                  "users": USERS, "source_key": source_key,
                                  "tenant_key": tenant_key})
        conn.execute("VACUUM (ANALYZE) events")
    return time.perf_counter() - started


HISTOGRAMS = ("relayq_router_log_read_events", "relayq_router_pickup_jobs",
              "relayq_router_flush_items", "relayq_router_flush_seconds",
              "relayq_router_delivery_seconds", "relayq_router_loop_lag_seconds")


def scrape(port: int) -> dict[str, tuple[float, float]]:
    """(count, sum) of the router's histograms, over all their labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    totals: dict[str, list[float]] = {n: [0.0, 0.0] for n in HISTOGRAMS}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, value = line.rpartition(" ")
        base = key.split("{", 1)[0]
        for n in HISTOGRAMS:
            if base == f"{n}_count":
                totals[n][0] += float(value)
            elif base == f"{n}_sum":
                totals[n][1] += float(value)
    return {n: (c, s) for n, (c, s) in totals.items()}


def activity(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
             ) -> str:
    """What the router did between two scrapes, in a line."""
    d = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in HISTOGRAMS}

    def mean(n: str) -> float:
        return d[n][1] / max(1.0, d[n][0])

    return (f"{d['relayq_router_log_read_events'][0]:,.0f} log reads of"
            f" {mean('relayq_router_log_read_events'):.0f} events;"
            f" {d['relayq_router_pickup_jobs'][0]:,.0f} row pickups of"
            f" {mean('relayq_router_pickup_jobs'):.0f} jobs;"
            f" {d['relayq_router_delivery_seconds'][0]:,.0f} requests,"
            f" {mean('relayq_router_delivery_seconds') * 1000:.1f} ms each;"
            f" {d['relayq_router_flush_items'][0]:,.0f} outcome transactions of"
            f" {mean('relayq_router_flush_items'):.0f}, "
            f"{mean('relayq_router_flush_seconds') * 1000:.1f} ms each;"
            f" event loop late by {mean('relayq_router_loop_lag_seconds') * 1000:.1f} ms"
            " on average")


# Each active backend of the database: what it waits on (none: on a CPU, or for one), the
# first words of its statement, and for a lock, the statement of the backend it waits for.
WAITS = r"""
SELECT coalesce(a.wait_event_type || ':' || a.wait_event, 'cpu'),
       left(regexp_replace(a.query, '\s+', ' ', 'g'), 48)
       || coalesce(' <- ' || (SELECT left(regexp_replace(b.query, '\s+', ' ', 'g'), 36)
                              FROM pg_stat_activity b
                              WHERE b.pid = (pg_blocking_pids(a.pid))[1]), '')
FROM pg_stat_activity a
WHERE a.datname = current_database() AND a.state = 'active' AND a.pid <> pg_backend_pid()
"""


class Waits:
    """What the database's backends are doing, sampled every 100 ms while running: active
    statements by their first words and what they wait on (none: on a CPU, or for one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: Counter[tuple[str, str]] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(dsn_for(self.name), autocommit=True) as conn:
            while not self._stop.wait(0.1):
                rows = conn.execute(WAITS).fetchall()
                self.samples += 1
                for wait, statement in rows:
                    self.seen[str(wait), str(statement)] += 1

    def report(self, top: int = 8) -> str:
        busy = sum(self.seen.values()) / max(1, self.samples)
        lines = [f"{busy:.1f} backends active on average over {self.samples} samples; most:"]
        for (wait, statement), n in self.seen.most_common(top):
            lines.append(f"      {n / max(1, self.samples):4.2f} {wait:<28} {statement}")
        return "\n".join(lines)


def cpu(pids: dict[str, int], name: str) -> dict[str, dict[int, float]]:
    """CPU readings of the services and of the database's backends."""
    readings = {service: service_cpu(pid) for service, pid in pids.items()}
    readings["postgres"] = {p: cpu_seconds(p) for p in _backends(name)}
    return readings


def used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
         ) -> dict[str, float]:
    return {k: cpu_since(before[k], after[k]) for k in before}


def latencies(arrivals: dict[str, float], sent: dict[str, float]) -> list[float]:
    return [max(0.0, arrivals[m] - t) * 1000 for m, t in sent.items() if m in arrivals]


def describe(values: list[float], expected: int) -> str:
    if not values:
        return f"none of {expected:,} arrived"
    return (f"p50 {statistics.median(values):.1f} ms, p99 {percentile(values, 0.99):.1f} ms,"
            f" max {max(values):.0f} ms ({len(values):,} of {expected:,} arrived)")


def read_arrivals(sink: Sink) -> list[tuple[str, float]]:
    """Stop the sink and read every arrival, in order (the replay delivers each id again)."""
    sink.process.send_signal(signal.SIGTERM)
    sink.process.wait(60)
    lines = sink.out.read_text().splitlines()
    sink.out.unlink()
    return [(m, float(t)) for m, t in (line.split() for line in lines)]


def span(times: list[float]) -> str:
    if not times:
        return "nothing arrived"
    elapsed = max(times) - min(times)
    return (f"{len(times):,} arrivals from first to last in {elapsed:.1f}s"
            f" = {len(times) / max(elapsed, 1e-9):,.0f}/s")


def run(events: int, live_rate: float, baseline_seconds: float,
        router_env: dict[str, str]) -> None:
    name = create_database()
    d1, d2 = Sink("grpc"), Sink("grpc")
    services: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with psycopg.connect(dsn_for(name), autocommit=True) as conn:
            # Paused until the router is up: its start-up is not counted.
            _, tenant_key, source_a, keys = add_source(conn, "bench", "a", {
                "d1": ("grpc", d1.endpoint)}, paused=True)
            write_key_b, *_ = add_source(conn, "bench", "b", {"d2": ("grpc", d2.endpoint)})
        loaded = load(name, source_a, tenant_key, events)
        print(f"replay bench: {events:,} events of source a written into the log in"
              f" {loaded:.1f}s; live traffic of source b at {live_rate:,.0f} events/s")

        ports = {s: free_port() for s in ("router", "ingest", "admin", "metrics")}
        env = {**QUIET, "RELAYQ_DATABASE_URL": dsn_for(name),
               "RELAYQ_ADMIN_METRICS_ADDRESS": "off", "RELAYQ_ADMIN_TOKEN": TOKEN}
        router = spawn("router_service.main", {
            **env, "RELAYQ_ROUTER_ADDRESS": f"127.0.0.1:{ports['router']}",
            "RELAYQ_ROUTER_METRICS_ADDRESS": f"127.0.0.1:{ports['metrics']}", **router_env})
        services["router"] = router
        ingest = spawn("ingest_service.main", {
            **env, "RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{ports['ingest']}"})
        services["ingest"] = ingest
        admin = spawn("admin_service.main", {
            **env, "RELAYQ_ADMIN_ADDRESS": f"127.0.0.1:{ports['admin']}"})
        services["admin"] = admin
        for service in ("router", "ingest", "admin"):
            wait_ready(ports[service])
        time.sleep(1.0)  # the router's first heartbeat and reads
        _wait_split(name, 1)
        pids = {"router": router.pid}
        counts = Counts(name, keys["d1"])

        # 1. normal delivery from the log
        before, scraped = cpu(pids, name), scrape(ports["metrics"])
        normal_start = time.time()
        counts.conn.execute("UPDATE destinations SET paused = false WHERE id = 'd1'")
        normal_end = counts.wait(events, within=max(600.0, events / 200))
        normal_cpu = used(before, cpu(pids, name))
        normal_activity = activity(scraped, scrape(ports["metrics"]))
        normal_rate = events / (normal_end - normal_start)
        time.sleep(1.0)

        # 2. live traffic alone
        live = Live(ports["ingest"], write_key_b, live_rate, "base")
        before = cpu(pids, name)
        live.start()
        time.sleep(baseline_seconds)
        live.stop()
        baseline_cpu = {k: v / baseline_seconds for k, v in used(before, cpu(pids, name)).items()}
        baseline_sent = dict(live.sent)
        baseline_refused = (f"; {live.failed:,} refused by ingest ({live.error})"
                            if live.failed else "")
        time.sleep(2.0)

        # 3. the replay, live traffic flowing
        live = Live(ports["ingest"], write_key_b, live_rate, "rpl")
        live.start()
        time.sleep(2.0)  # live traffic in its stride first
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(f"127.0.0.1:{ports['admin']}") as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            waits = Waits(name)
            waits.start()
            version = counts.config_version()
            before, scraped = cpu(pids, name), scrape(ports["metrics"])
            replay_start = time.time()
            answer = stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
                source_id="a", destination_id="d1", reason="bench"), metadata=metadata,
                timeout=600)
            called = time.time() - replay_start
            replay_id = answer.replay.replay_id
            written_at, polls = _watch(stub, metadata, replay_id, counts, 2 * events,
                                       within=max(600.0, events / 100))
            replay_end = time.time()
            replay_cpu = used(before, cpu(pids, name))
            replay_activity = activity(scraped, scrape(ports["metrics"]))
            waits.stop()
            bumps = counts.config_version() - version
            final = stub.GetReplay(admin_pb2.GetReplayRequest(replay_id=replay_id),
                                   metadata=metadata, timeout=600)
        recorded_end = polls.recorded_at
        live.stop()
        replay_sent = {m: t for m, t in live.sent.items()
                       if replay_start <= t <= recorded_end}
        time.sleep(2.0)  # the last live events arrive
        for process in services.values():
            stop(process)
        d1_arrivals = read_arrivals(d1)
        d2_arrivals: dict[str, float] = {}
        for m, t in read_arrivals(d2):
            d2_arrivals.setdefault(m, t)
    finally:
        for process in services.values():
            if process.poll() is None:
                stop(process)
        for sink in (d1, d2):
            if sink.process.poll() is None:
                sink.process.kill()
        drop_database(name)

    replay_rate = events / (recorded_end - replay_start)
    print(f"  normal: d1 received all {events:,} from the log, every success counted"
          f" {normal_end - normal_start:.1f}s after the resume = {normal_rate:,.0f} events/s")
    print(f"    at the sink: {span([t for _, t in d1_arrivals if t < replay_start])}")
    print(f"    router: {normal_activity}")
    print(f"  replay {replay_id}: ReplayEvents answered in {called * 1000:.0f} ms (matched"
          f" {answer.matched:,}); rows all written {written_at - replay_start:.1f}s after the"
          f" call; every replayed success counted {recorded_end - replay_start:.1f}s after"
          f" it = {replay_rate:,.0f} events/s; GetReplay done, pending 0 after"
          f" {replay_end - replay_start:.1f}s")
    replayed = [t for _, t in d1_arrivals if t >= replay_start]
    print(f"    at the sink: {span(replayed)}"
          + (f"; the first {min(replayed) - replay_start:.1f}s after the call"
             if replayed else ""))
    while_writing = [t for t in replayed if t <= written_at]
    print(f"    delivered while the rows were being written: {len(while_writing):,}"
          f" ({len(while_writing) / max(written_at - replay_start, 1e-9):,.0f}/s); after:"
          f" {len(replayed) - len(while_writing):,}"
          f" ({(len(replayed) - len(while_writing)) / max(recorded_end - written_at, 1e-9):,.0f}"
          "/s)")
    print(f"    router (live traffic too): {replay_activity}")
    print(f"    the connections' version (relayq_config_version) was bumped {bumps:,} times"
          f" during the replay ({events / 5000:,.0f} chunks of 5,000 events)")
    print(f"    Postgres during the replay: {waits.report()}")
    print(f"    GetReplay at the end: state {final.state}, written {final.written:,},"
          f" delivered {final.delivered:,}, pending {final.pending:,}, aborted"
          f" {final.aborted:,}; {len(polls.seconds)} GetReplay calls while it ran, median"
          f" {statistics.median(polls.seconds) * 1000:.0f} ms,"
          f" max {max(polls.seconds) * 1000:.0f} ms")
    print(f"  replay / normal: {replay_rate / normal_rate:.2f} (issue 18's target: >= 0.5)")
    seconds = recorded_end - replay_start
    normal_seconds = normal_end - normal_start
    per = 1e6 / events
    print(f"  CPU per event, normal: router {normal_cpu['router'] * per:.0f} us, its Postgres"
          f" backends {normal_cpu['postgres'] * per:.0f} us (router"
          f" {normal_cpu['router'] / normal_seconds * 100:.0f}%, Postgres"
          f" {normal_cpu['postgres'] / normal_seconds * 100:.0f}% of a core)")
    print(f"  CPU per replayed event: router {replay_cpu['router'] * per:.0f} us, its Postgres"
          f" backends {replay_cpu['postgres'] * per:.0f} us, live traffic's included (router"
          f" {replay_cpu['router'] / seconds * 100:.0f}%, Postgres"
          f" {replay_cpu['postgres'] / seconds * 100:.0f}% of a core; the live traffic alone:"
          f" router {baseline_cpu['router'] * 100:.0f}%,"
          f" Postgres {baseline_cpu['postgres'] * 100:.0f}%)")
    print(f"  live b -> d2, client send -> sink: alone ({baseline_seconds:.0f}s)"
          f" {describe(latencies(d2_arrivals, baseline_sent), len(baseline_sent))}"
          + baseline_refused)
    print(f"    during the replay ({seconds:.0f}s)"
          f" {describe(latencies(d2_arrivals, replay_sent), len(replay_sent))}"
          + (f"; {live.failed:,} refused by ingest ({live.error})" if live.failed else ""))


@dataclass
class Polls:
    seconds: list[float] = field(default_factory=list)
    recorded_at: float = 0.0


def _watch(stub: admin_pb2_grpc.AdminStub, metadata: tuple[tuple[str, str], ...],
           replay_id: str, counts: Counts, successes: int, within: float
           ) -> tuple[float, Polls]:
    """Until every success is counted and GetReplay says done with nothing pending, asking
    GetReplay every 5 seconds (it counts the replay's rows: not free). Returns when every row
    was first seen written, and the calls' times and when the successes were all counted."""
    deadline = time.monotonic() + within
    polls = Polls()
    written_at = 0.0
    next_poll = 0.0
    while time.monotonic() < deadline:
        if not polls.recorded_at and counts.succeeded() >= successes:
            polls.recorded_at = time.time()
        if time.monotonic() >= next_poll or polls.recorded_at:
            clock = time.perf_counter()
            replay = stub.GetReplay(admin_pb2.GetReplayRequest(replay_id=replay_id),
                                    metadata=metadata, timeout=600)
            polls.seconds.append(time.perf_counter() - clock)
            next_poll = time.monotonic() + 5.0
            if replay.state == "done" and not written_at:
                written_at = time.time()
            if replay.state == "done" and replay.pending == 0 and polls.recorded_at:
                return written_at, polls
            if replay.state == "cancelled":
                raise SystemExit(f"replay {replay_id} was cancelled")
        time.sleep(0.05 if not polls.recorded_at else 0.2)
    raise SystemExit(f"replay {replay_id} not finished in {within:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--live-rate", type=float, default=500)
    parser.add_argument("--baseline-seconds", type=float, default=20)
    parser.add_argument("--router-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the router (RELAYQ_ROUTER_FLUSH_CONCURRENCY=4, ...);"
                             " repeatable")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, 5,000 events")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.smoke:
        args.events, args.baseline_seconds = 5_000, 3
    router_env = dict(setting.split("=", 1) for setting in args.router_env)
    run(args.events, args.live_rate, args.baseline_seconds, router_env)


if __name__ == "__main__":
    main()
