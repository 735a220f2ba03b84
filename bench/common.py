"""Helpers shared by the benchmarks: fresh databases, processes, ports, CPU accounting."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobsdb import migrate  # noqa: E402
from jobsdb.keys import hash_secret, new_secret, new_signing_secret  # noqa: E402
from jobsdb.sealing import new_key  # noqa: E402
from relayq.ports import free_port as free_port  # noqa: E402 - re-exported for the benches

SERVER = os.environ.get("RELAYQ_BENCH_SERVER_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(name: str) -> str:
    params = conninfo_to_dict(SERVER)
    params["dbname"] = name
    return make_conninfo(**params)


def create_database() -> str:
    """A fresh, migrated database; returns its name."""
    name = f"relayq_bench_{secrets.token_hex(4)}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    async def prepare() -> None:
        async with await psycopg.AsyncConnection.connect(dsn_for(name), autocommit=True) as c:
            await migrate.migrate(c)

    asyncio.run(prepare())
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def add_source(conn: psycopg.Connection[object], tenant: str, source: str,
               destinations: Mapping[str, tuple[str, str]], **columns: object
               ) -> tuple[str, int, int, dict[str, int]]:
    """Tenant (created if new), source and destinations {id: (type, endpoint)}, all connected;
    webhooks with a signing secret.

    Returns (write key, tenant key, source key, {destination id: key}).
    """
    row = conn.execute("INSERT INTO tenants (id) VALUES (%s) ON CONFLICT (id) DO UPDATE"
                       " SET name = EXCLUDED.name RETURNING tenant_key", (tenant,)).fetchone()
    assert row is not None
    tenant_key = int(row[0])
    row = conn.execute("INSERT INTO sources (id, tenant_key) VALUES (%s, %s) RETURNING source_key",
                       (source, tenant_key)).fetchone()
    assert row is not None
    source_key = int(row[0])
    write_key = new_secret("rq_wk_")
    conn.execute("INSERT INTO write_keys (key_hash, source_key) VALUES (%s, %s)",
                 (hash_secret(write_key), source_key))
    keys = {}
    names = ["id", "tenant_key", "type", "endpoint", *columns]
    statement = sql.SQL("INSERT INTO destinations ({}) VALUES ({}) RETURNING destination_key"
                        ).format(sql.SQL(", ").join(map(sql.Identifier, names)),
                                 sql.SQL(", ").join(sql.Placeholder() * len(names)))
    for destination, (kind, endpoint) in destinations.items():
        row = conn.execute(statement, [destination, tenant_key, kind, endpoint,
                                       *columns.values()]).fetchone()
        assert row is not None
        keys[destination] = int(row[0])
        conn.execute("INSERT INTO connections (source_key, destination_key) VALUES (%s, %s)",
                     (source_key, row[0]))
        if kind == "webhook":  # signed, as CreateDestination makes them
            conn.execute("INSERT INTO destination_secrets (destination_key, secret)"
                         " VALUES (%s, %s)", (row[0], new_signing_secret()))
    return write_key, tenant_key, source_key, keys


def wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
    raise SystemExit(f"nothing answered on port {port}")


# Every service one process unless a benchmark asks for workers (RELAYQ_*_WORKERS in `env`):
# a figure stays comparable with the runs before workers existed, the CPU per event read from
# one pid is the service's, and a kill -9 (bench/chaos.py) kills what it names.
# The document of sample event i (user i mod %(users)s) as SQL, for benchmarks that fill the
# log straight from generate_series: kinds vary within a user (i / 5 mod 5), ~330 bytes.
SAMPLE_DOCUMENT = """jsonb_build_object(
           'type', 'track',
           'event', (ARRAY['Order Completed', 'Product Viewed', 'Cart Updated',
                           'Checkout Started', 'Signed In'])[1 + i / 5 %% 5],
           'userId', 'user-' || (i %% %(users)s),
           'messageId', 'msg-' || i,
           'timestamp', '2026-11-25T10:00:00.000Z',
           'properties', jsonb_build_object(
               'order_id', i, 'sku', 'sku-' || (i %% 997), 'revenue', (i %% 500) / 10.0,
               'currency', 'EUR', 'coupon', 'WINTER-' || (i %% 13),
               'note', repeat('x', 120)))::text"""

ONE_PROCESS = {"RELAYQ_INGEST_WORKERS": "1", "RELAYQ_ROUTER_WORKERS": "1"}
# The benchmarks' sinks are on loopback, which the network policy refuses to destinations by
# default (relayq.netpolicy): every service they start allows loopback, and only loopback.
# Secrets are sealed at rest under RELAYQ_SECRET_KEYS (jobsdb.sealing): a key for the run.
LOCAL_DESTINATIONS = {"RELAYQ_DESTINATION_ALLOW_NETWORKS": "127.0.0.0/8,::1/128",
                      "RELAYQ_SECRET_KEYS": new_key()}


def spawn(module: str, env: Mapping[str, str], cpus: str | None = None
          ) -> subprocess.Popen[bytes]:
    """Run a service's main(); profiled when RELAYQ_BENCH_PROFILE names an output prefix.

    `cpus` ("0", "0,1"): run it under `taskset -c`, it and its workers on those CPUs only
    (the workers' default count follows: one per CPU it may use).

    py-spy attaches to the running service rather than starting it: a profiler that owns the
    process is stopped by the benchmark's SIGTERM before it writes anything. Attached, it
    writes `<prefix>.<service>` (raw collapsed stacks) when the service exits; with workers,
    it profiles their supervisor only.
    """
    command = service_command(module, cpus)
    process = subprocess.Popen(command, env={**os.environ, **ONE_PROCESS, **LOCAL_DESTINATIONS,
                                             "RELAYQ_LOG_LEVEL": "warning", **env})
    profile = os.environ.get("RELAYQ_BENCH_PROFILE")
    if profile:
        py_spy = Path(sys.executable).with_name("py-spy")
        _profilers.append(subprocess.Popen(
            [str(py_spy) if py_spy.exists() else "py-spy", "record", "--format", "raw",
             "--rate", "200", "--nonblocking", "--pid", str(process.pid),
             "-o", f"{profile}.{module.split('.')[0]}"]))
        atexit.register(_wait_profilers)
    return process


_profilers: list[subprocess.Popen[bytes]] = []


def _wait_profilers() -> None:
    for profiler in _profilers:
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.send_signal(signal.SIGINT)


def service_command(module: str, cpus: str | None = None) -> list[str]:
    command = [sys.executable, "-c", f"import {module} as m; m.main()"]
    return ["taskset", "-c", cpus, *command] if cpus else command


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_of(pid: int) -> list[int]:
    """The live child processes of `pid` (a service's workers, when it supervises some)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def service_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a service process and of each of its workers, by pid."""
    used = {}
    for process in (pid, *workers_of(pid)):
        with contextlib.suppress(OSError):  # a worker gone meanwhile
            used[process] = cpu_seconds(process)
    return used


def cpu_since(before: dict[int, float], now: dict[int, float]) -> float:
    """CPU seconds used between two service_cpu readings (a worker new since counts whole)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in now.items())


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def histogram_means(port: int, *names: str) -> dict[str, tuple[float, float]]:
    """(count, mean) of Prometheus histograms scraped from a process's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("#") and " " in line:
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return {n: (values.get(f"{n}_count", 0.0),
                values.get(f"{n}_sum", 0.0) / max(1.0, values.get(f"{n}_count", 0.0)))
            for n in names}
