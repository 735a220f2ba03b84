"""Faults of the database, with real processes against a Postgres of the test's own
(tests/pginstance.py): its disk full during a load, and its connections all taken by others.

What must hold through either: ingest answers RESOURCE_EXHAUSTED (no space) or UNAVAILABLE
(no connection) with a message saying so, and acknowledges nothing it did not commit; routers
record only what they delivered, and deliver again nothing they recorded; admin answers a
clear error; no process dies or spins; each process's `relayq.database` health check says
NOT_SERVING meanwhile; and once space or connections return, everything resumes without a
restart: every event ingest acknowledged reaches the sink once, in each user's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from jobsdb import migrate
from relayq.server import DATABASE_HEALTH
from relayq.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests import factories, pginstance
from tests.helpers import auth, event
from tests.poll import eventually, wait_until
from tests.services import (
    OPERATOR_TOKEN,
    ServiceProcess,
    admin_process,
    ingest_process,
    router_process,
)
from tests.sinks import WebhookSink

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(pginstance.available() is not None,
                       reason=pginstance.available() or ""),
]

USERS = 8
ROLE = "relayq_svc"


@pytest.fixture(scope="module")
def instance() -> Iterator[pginstance.Instance]:
    with pginstance.small_postgres(space_mb=48, max_connections=40) as running:
        running.execute(
            sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(ROLE)),
            sql.SQL("CREATE TABLESPACE small OWNER {} LOCATION {}").format(
                sql.Identifier(ROLE), sql.Literal(str(running.space))))
        yield running


async def database(instance: pginstance.Instance, *, on_tmpfs: bool) -> str:
    """A migrated database owned by the services' role (not a superuser: the slots Postgres
    reserves for superusers stay the test's), on the tmpfs or not."""
    name = f"relayq_{secrets.token_hex(4)}"
    instance.execute(sql.SQL("CREATE DATABASE {} OWNER {}{}").format(
        sql.Identifier(name), sql.Identifier(ROLE),
        sql.SQL(" TABLESPACE small") if on_tmpfs else sql.SQL("")))
    dsn = instance.dsn(name, user=ROLE)
    await migrate.prepare(dsn, apply=True, wait_seconds=10, application_name="test")
    return dsn


@dataclass
class Load:
    """A producer that sends one event per user per batch, each batch again until acked (as
    relayq.client does: the same message ids, so a retry of what was stored is a duplicate),
    so each user's acknowledged events are in order. Records every refusal it got."""

    stub: ingest_pb2_grpc.IngestStub
    write_key: str
    acked: list[str] = field(default_factory=list)
    refusals: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    sent_batches: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            n = self.sent_batches
            batch = [event(f"u{u}-{n}", f"u{u}") for u in range(USERS)]
            while True:
                try:
                    await self.stub.Ingest(ingest_pb2.IngestRequest(events=batch),
                                           metadata=auth(self.write_key), timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    self.refusals.append((exc.code(), exc.details() or ""))
                    await asyncio.sleep(0.1)
            self.acked.extend(e.message_id for e in batch)
            self.sent_batches += 1
            await asyncio.sleep(0.01)

    def codes(self) -> set[grpc.StatusCode]:
        return {code for code, _ in self.refusals}


@contextlib.asynccontextmanager
async def cluster(dsn: str, sink: WebhookSink) -> AsyncIterator[dict[str, Any]]:
    """Ingest, router and admin processes on `dsn`, a source connected to the sink, and a
    load running until the block ends."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        tenant = await factories.tenant(conn)
        source = await factories.source(conn, tenant)
        key = await factories.destination(conn, tenant, "sink", endpoint=sink.url,
                                          min_backoff_ms=50, max_backoff_ms=500)
        await factories.connect(conn, source.key, key)
    processes: dict[str, ServiceProcess] = {}
    channels: list[grpc.aio.Channel] = []
    stop = asyncio.Event()
    try:
        processes["ingest"] = ingest_process(dsn)
        processes["router"] = router_process(dsn)
        processes["admin"] = admin_process(dsn)
        ports = {name: process.port for name, process in processes.items()}
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ports[n]}") for n in processes]
        by_name = dict(zip(processes, channels, strict=True))
        load = Load(ingest_pb2_grpc.IngestStub(by_name["ingest"]), source.write_key)
        running = asyncio.create_task(load.run(stop))
        yield {"processes": processes, "load": load, "channels": by_name,
               "admin": admin_pb2_grpc.AdminStub(by_name["admin"]), "stop": stop,
               "running": running}
        stop.set()
        await asyncio.wait_for(running, 60)
    finally:
        stop.set()
        if "running" in locals() and not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running
        for channel in channels:
            await channel.close()
        for process in processes.values():
            process.close()


async def database_health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=DATABASE_HEALTH), timeout=5)
    return int(answer.status)


def cpu_seconds(process: ServiceProcess) -> float:
    fields = Path(f"/proc/{process.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in ticks of 1/100 s


async def idle_while_stuck(processes: dict[str, ServiceProcess], seconds: float = 3.0) -> None:
    """No process died, and none spins while the database cannot be used."""
    before = {name: cpu_seconds(p) for name, p in processes.items()}
    await asyncio.sleep(seconds)
    for name, process in processes.items():
        assert process.process.poll() is None, f"{name} died: {process.stderr()}"
        used = cpu_seconds(process) - before[name]
        assert used < 0.5 * seconds, f"{name} used {used:.2f}s of CPU in {seconds}s"


async def delivered_once_in_order(sink: WebhookSink, acked: list[str]) -> None:
    """Every acknowledged event arrived exactly once, each user's in order: what the router
    delivered before or during the fault is on record once Postgres is back."""
    await sink.wait_for(lambda: {d.message_id for d in sink.oks} >= set(acked), within=60)
    await asyncio.sleep(1)  # anything delivered twice would arrive by now
    seen = [d.message_id for d in sink.oks]
    twice = sorted({m for m in seen if seen.count(m) > 1})
    assert not twice, f"delivered more than once: {twice[:10]}"
    order: dict[str, list[int]] = defaultdict(list)
    first: set[str] = set()
    for message_id in seen:
        if message_id in first:
            continue
        first.add(message_id)
        user, _, n = message_id.partition("-")
        order[user].append(int(n))
    for user, numbers in order.items():
        assert numbers == sorted(numbers), f"{user} out of order: {numbers}"


async def test_a_full_disk_loses_nothing_acknowledged(instance: pginstance.Instance) -> None:
    dsn = await database(instance, on_tmpfs=True)
    sink = WebhookSink()
    await sink.start()
    try:
        async with cluster(dsn, sink) as running:
            load: Load = running["load"]
            await eventually(lambda: len(load.acked) >= 20 * USERS, within=60)
            instance.fill()
            try:
                # The tables grow into pages that are not there: writes fail, named.
                await eventually(lambda: grpc.StatusCode.RESOURCE_EXHAUSTED in load.codes(),
                                 within=60, what=lambda: f"refusals {load.refusals[-3:]}")
                details = next(d for c, d in load.refusals
                               if c == grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert "out of disk space" in details, details
                assert load.codes() <= {grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        grpc.StatusCode.UNAVAILABLE}, load.refusals
                await eventually(lambda: _not_serving(running["channels"]["ingest"]),
                                 within=10, what="ingest's database health NOT_SERVING")
                # (A batch may still fit now and then, in pages with room: it is committed.)
                await idle_while_stuck(running["processes"])
                # Admin answers: done, or out of space said plainly, never an internal error.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await running["admin"].CreateTenant(
                        admin_pb2.CreateTenantRequest(id="later", name="x" * 5000),
                        metadata=auth(OPERATOR_TOKEN), timeout=10)
            finally:
                instance.free()
            # Space is back: everything resumes, without a restart.
            resumed = len(load.acked)
            await eventually(lambda: len(load.acked) >= resumed + 10 * USERS, within=60)
            await eventually(lambda: _serving(running["channels"]["ingest"]), within=15)
            for process in running["processes"].values():
                assert process.process.poll() is None
        await delivered_once_in_order(sink, load.acked)
    finally:
        await sink.stop()


async def test_connections_refused_while_max_connections_are_taken(
        instance: pginstance.Instance) -> None:
    dsn = await database(instance, on_tmpfs=False)
    sink = WebhookSink()
    await sink.start()
    hogs: list[psycopg.Connection[Any]] = []
    try:
        async with cluster(dsn, sink) as running:
            load: Load = running["load"]
            await eventually(lambda: len(load.acked) >= 20 * USERS, within=60)
            # Others take every connection, and the services' sessions end (as when Postgres
            # restarts): they can get none back.
            hogs = take_every_connection(instance, dsn,
                                         list(running["processes"].values()))
            try:
                # The first refusals may be of the sessions that ended; then, that no
                # connection can be had, said plainly.
                await eventually(lambda: any("max_connections" in d for _, d in load.refusals),
                                 within=30, what=lambda: f"refusals {load.refusals[-3:]}")
                assert load.codes() == {grpc.StatusCode.UNAVAILABLE}, load.codes()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await running["admin"].ListTenants(admin_pb2.ListTenantsRequest(),
                                                       metadata=auth(OPERATOR_TOKEN),
                                                       timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "max_connections" in (refused.value.details() or "")
                for name in ("ingest", "admin", "router"):
                    await eventually(lambda n=name: _not_serving(running["channels"][n]),
                                     within=15, what=f"{name}'s database health NOT_SERVING")
                stuck_at = len(load.acked)
                await idle_while_stuck(running["processes"])
                assert len(load.acked) == stuck_at
            finally:
                for hog in hogs:
                    hog.close()
            resumed = len(load.acked)
            await eventually(lambda: len(load.acked) >= resumed + 10 * USERS, within=60)
            for name in ("ingest", "admin", "router"):
                await eventually(lambda n=name: _serving(running["channels"][n]), within=20,
                                 what=f"{name}'s database health SERVING again")
        # The sessions that ended rolled back the flushes in flight, and the router's leases
        # ran out while it could not reach Postgres; but nobody took them, and its writes are
        # fenced by owner, not expiry, so the retried flushes record everything delivered
        # and its heartbeat renews the leases it still owns: nothing is delivered twice.
        await delivered_once_in_order(sink, load.acked)
    finally:
        for hog in hogs:
            hog.close()
        await sink.stop()


def take_every_connection(instance: pginstance.Instance, dsn: str,
                          services: list[ServiceProcess]) -> list[Any]:
    """Connections of another role in every slot but the superusers' reserve, with the
    services' own sessions ended (as when Postgres restarts); returns them (close them to give
    the slots back). The services are paused (SIGSTOP) meanwhile, so they cannot take the
    freed slots back before the others do."""
    hogs: list[Any] = []
    other = dsn.replace(f"{ROLE}@", "hog@")
    with contextlib.suppress(psycopg.errors.DuplicateObject):
        instance.execute("CREATE ROLE hog LOGIN")
    for service in services:
        service.process.send_signal(signal.SIGSTOP)
    try:
        with psycopg.connect(instance.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE usename = %s", (ROLE,))
            wait_until(lambda: admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                (ROLE,)).fetchone() == (0,), within=10, every=0.05,
                what="the services' sessions to end")
        refusal = ""
        while not refusal:
            try:
                hogs.append(psycopg.connect(other, autocommit=True, connect_timeout=5))
            except psycopg.OperationalError as exc:
                refusal = str(exc)
        assert "too many clients" in refusal or "reserved" in refusal, refusal
        return hogs
    finally:
        for service in services:
            service.process.send_signal(signal.SIGCONT)


async def _not_serving(channel: grpc.aio.Channel) -> bool:
    return await database_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING


async def _serving(channel: grpc.aio.Channel) -> bool:
    return await database_health(channel) == health_pb2.HealthCheckResponse.SERVING
