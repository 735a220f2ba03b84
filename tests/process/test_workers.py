"""Services run as several workers (RELAYQ_INGEST_WORKERS, RELAYQ_ROUTER_WORKERS): real
processes sharing a port and the partition leases, one /metrics adding them up, restarts,
draining, and the failures that must still stop the service at once with one line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from psycopg import AsyncConnection

from jobsdb import leases
from relayq.ports import free_port
from relayq.v1 import ingest_pb2, ingest_pb2_grpc, router_pb2, router_pb2_grpc
from tests import factories
from tests.cluster import Service, sample, service
from tests.databases import dsn_for
from tests.helpers import auth, count, event, first_deliveries_in_order, owners
from tests.pipeline import World, send, states, wait_until_finished
from tests.poll import eventually
from tests.services import OPERATOR_TOKEN, finish_stderr, gone, ingest, launch, quiet_env
from tests.sinks import Answer

pytestmark = pytest.mark.process


def environment(pid: int) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in
                Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in entry)


def counted_by(worker: int, name: str, **labels: str) -> float:
    """A counter as one worker alone counted it: its own file among those the supervisor
    adds up (PROMETHEUS_MULTIPROC_DIR, read from the worker's environment)."""
    path = Path(environment(worker)["PROMETHEUS_MULTIPROC_DIR"]) / f"counter_{worker}.db"
    if not path.exists():
        return 0.0
    for family in MultiProcessCollector.merge([str(path)], accumulate=True):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def connections(port: int, count_: int) -> list[grpc.aio.Channel]:
    """`count_` channels, each with a TCP connection of its own (gRPC shares one between the
    channels of a process otherwise): the kernel hands each to one worker."""
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                      options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count_)]


async def ingest_on_each(channels: list[grpc.aio.Channel], source: factories.Source,
                         prefix: str, events: int = 5) -> list[ingest_pb2.IngestResponse]:
    return await asyncio.gather(*(
        ingest_pb2_grpc.IngestStub(channel).Ingest(
            ingest_pb2.IngestRequest(events=[event(f"{prefix}-{c}-{i}", f"u{i}")
                                             for i in range(events)]),
            metadata=auth(source.write_key), timeout=15)
        for c, channel in enumerate(channels)))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    with subprocess.Popen([sys.executable, "-c", "pass"]) as ended:
        ended.wait(30)
    return ended.pid


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def serving(service_: Service, workers: int) -> None:
    await eventually(lambda: sample(service_.scrape(), "relayq_workers") == workers,
                     what=service_.log)


async def test_ingest_workers_share_the_port_add_up_their_counts_and_one_killed_comes_back(
        database: str, web: factories.Source, tmp_path: Path) -> None:
    # What a supervisor killed outright left behind: removed by the next one to start.
    (tmp_path / f"relayq-ingest-metrics-{dead_pid()}-left").mkdir()
    with service("ingest", database, RELAYQ_INGEST_WORKERS="2", TMPDIR=str(tmp_path)) as ingest_:
        await serving(ingest_, 2)
        [mine] = listing(tmp_path)
        assert mine.startswith(f"relayq-ingest-metrics-{ingest_.process.process.pid}-")
        first = ingest_.process.workers()
        assert len(first) == 2
        channels = connections(ingest_.port, 24)
        answers = await ingest_on_each(channels, web, "a")
        assert sum(a.accepted for a in answers) == 120
        mine = {pid: counted_by(pid, "relayq_ingest_events_total", outcome="accepted")
                for pid in first}
        assert all(mine.values()), f"one worker got every connection: {mine}"
        assert sum(mine.values()) == 120
        assert sample(ingest_.scrape(), "relayq_ingest_events_total", outcome="accepted") == 120

        os.kill(first[0], signal.SIGKILL)

        async def replaced() -> bool:
            now = ingest_.process.workers()
            return (len(now) == 2 and first[0] not in now
                    and sample(ingest_.scrape(), "relayq_workers") == 2)
        await eventually(replaced, what=ingest_.log)
        samples = ingest_.scrape()
        assert sample(samples, "relayq_worker_restarts_total") == 1
        # The dead worker's counts stay in the sum.
        assert sample(samples, "relayq_ingest_events_total", outcome="accepted") == 120
        assert "was killed by SIGKILL; restarting it" in ingest_.log()
        for channel in channels:
            await channel.close()
        # Clients reconnect; the port is served by both again.
        channels = connections(ingest_.port, 24)
        answers = await ingest_on_each(channels, web, "b")
        assert sum(a.accepted for a in answers) == 120
        assert sample(ingest_.scrape(), "relayq_ingest_events_total", outcome="accepted") == 240
        for channel in channels:
            await channel.close()
        assert ingest_.process.terminate() == 0, ingest_.log()
    assert listing(tmp_path) == []


async def test_sigterm_drains_every_ingest_worker(
        database: str, conn: AsyncConnection[Any], web: factories.Source) -> None:
    """Requests in flight on both workers are committed and answered; nothing is lost."""
    # A long group-commit delay keeps requests in flight when the signal arrives.
    with service("ingest", database, RELAYQ_INGEST_WORKERS="2",
                 RELAYQ_INGEST_FLUSH_DELAY_MS="300") as ingest_:
        await serving(ingest_, 2)
        workers = ingest_.process.workers()
        directory = Path(environment(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
        channels = connections(ingest_.port, 20)
        await ingest_on_each(channels, web, "warm", events=1)
        # Each channel keeps its connection, so the requests below reach both workers too.
        assert all(counted_by(pid, "relayq_ingest_events_total", outcome="accepted")
                   for pid in workers)
        calls = asyncio.ensure_future(ingest_on_each(channels, web, "drained"))
        await asyncio.sleep(0.1)  # received, waiting for their flush
        ingest_.process.process.send_signal(signal.SIGTERM)
        answers = await calls
        assert await asyncio.to_thread(ingest_.process.process.wait, 20) == 0, ingest_.log()
        for channel in channels:
            await channel.close()
    assert sum(a.accepted for a in answers) == 100
    assert await count(conn, "events") == 20 + 100
    assert all(gone(pid) for pid in workers)
    assert not await asyncio.to_thread(directory.exists), "this start's metrics outlived it"


async def test_router_workers_share_the_leases_and_one_killed_takes_its_own_back_at_once(
        world: World) -> None:
    await world.destination("hook", concurrency=16)
    world.webhook.answer = lambda _: Answer(delay=0.01)
    events = [event(f"m{i}", f"user-{i % 40}") for i in range(1200)]
    # Leases of 9 s: a killed worker's partitions could move to its sibling only after that;
    # restarted under the same id, it takes them back long before.
    with service("router", world.database, RELAYQ_ROUTER_WORKERS="2",
                 RELAYQ_ROUTER_ID="pair", RELAYQ_ROUTER_LEASE_SECONDS="9") as router:

        async def split() -> bool:
            return await owners(world.conn) == {"pair/1": 32, "pair/2": 32}
        async def held() -> str:
            return f"partitions held {await owners(world.conn)}"
        await eventually(split, every=0.2, what=held)
        await serving(router, 2)
        assert sample(router.scrape(), "relayq_router_partitions_owned") == 64
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            status = await router_pb2_grpc.RouterStatusStub(channel).GetStatus(
                router_pb2.GetStatusRequest(), metadata=auth(OPERATOR_TOKEN), timeout=5)
        assert status.router_id in ("pair/1", "pair/2")
        assert [(r.router_id, r.partitions) for r in status.routers] == [("pair/1", 32),
                                                                          ("pair/2", 32)]

        async with ingest(world.database) as source:
            ids = await send(source, world.source, events)
        await world.webhook.wait_for(lambda: len(world.webhook.oks) >= 300)
        one = _worker_with_id(router, "pair/1")
        os.kill(one, signal.SIGKILL)
        killed_at = time.monotonic()
        taken_by_sibling = 0

        async def back() -> bool:
            nonlocal taken_by_sibling
            now = await owners(world.conn)
            taken_by_sibling = max(taken_by_sibling, now.get("pair/2", 0))
            return now.get("pair/1") == 32
        await eventually(back, every=0.1, what=held)
        assert time.monotonic() - killed_at < 9, "waited the lease out"
        assert taken_by_sibling == 32
        await wait_until_finished(world.conn, len(ids))
        samples = router.scrape()
        assert sample(samples, "relayq_router_partitions_owned") == 64
        delivered = sample(samples, "relayq_router_deliveries_total", destination="hook",
                           outcome="ok")
        assert len(ids) <= delivered <= len(world.webhook.oks)
        assert router.process.terminate() == 0, router.log()
    assert await owners(world.conn) == {"": 64}
    async with await psycopg.AsyncConnection.connect(world.database) as conn:
        assert await leases.live_routers(conn) == []
    ids_by_user: dict[str, list[int]] = defaultdict(list)
    for e, job_id in zip(events, ids, strict=True):
        ids_by_user[e.user_id].append(job_id)
    first_deliveries_in_order(ids_by_user, world.webhook.oks)
    assert set((await states(world.conn)).values()) == {"succeeded"}
    # No ordering key was ever being delivered by both workers at the same time.
    assert world.webhook.max_open_per_user == 1


def _worker_with_id(router: Service, router_id: str) -> int:
    for pid in router.process.workers():
        if environment(pid).get("RELAYQ_ROUTER_ID") == router_id:
            return pid
    raise AssertionError(f"no worker runs as {router_id}")


# --- failures that stop a supervisor at once ---------------------------------------------

SERVICES = [("ingest", "ingest_service.main"), ("router", "router_service.main")]


@pytest.fixture(params=["plain", "reuseport"])
def taken(request: pytest.FixtureRequest) -> Iterator[int]:
    """A port another process listens on: plainly, or with SO_REUSEPORT (as a gRPC server
    does by default), which the workers' own sharing must not let in."""
    with socket.socket() as sock:
        if request.param == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(("name", "module"), SERVICES, ids=[s for s, _ in SERVICES])
def test_a_supervisor_refuses_a_port_someone_else_listens_on(
        database: str, taken: int, name: str, module: str) -> None:
    variable = f"RELAYQ_{name.upper()}_ADDRESS"
    started = time.monotonic()
    process = launch(module, quiet_env(database, **{
        variable: f"127.0.0.1:{taken}", f"RELAYQ_{name.upper()}_WORKERS": "2"}))
    err = finish_stderr(process, 30)
    assert process.returncode == 1, err
    assert err.strip().splitlines() == [
        f"relayq-{name}: {variable}=127.0.0.1:{taken}: address already in use"]
    assert time.monotonic() - started < 2.0 + 1.5


@pytest.mark.parametrize(("name", "module"), SERVICES, ids=[s for s, _ in SERVICES])
def test_a_database_that_refuses_us_stops_a_supervisor_at_once_with_its_message(
        name: str, module: str) -> None:
    started = time.monotonic()
    process = launch(module, quiet_env(dsn_for("relayq_no_such_database"), **{
        f"RELAYQ_{name.upper()}_WORKERS": "2",
        f"RELAYQ_{name.upper()}_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"}))
    err = finish_stderr(process, 30)
    assert process.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        f'relayq-{name}: Postgres refused the connection: database "relayq_no_such_database"'
        ' does not exist')
    assert "Traceback" not in err
    assert time.monotonic() - started < 2.0 + 1.5


async def test_a_worker_that_cannot_start_stops_the_service_with_its_own_line(
        database: str) -> None:
    """Worker 2's id is held by a live router (here, the test's session): the worker gives
    up after a lease, and the supervisor stops worker 1 and exits with worker 2's line."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as holder:
        assert await leases.claim_identity(holder, "held/2")
        process = launch("router_service.main", quiet_env(
            database, RELAYQ_ROUTER_WORKERS="2", RELAYQ_ROUTER_ID="held",
            RELAYQ_ROUTER_LEASE_SECONDS="2"))
        err = await asyncio.to_thread(finish_stderr, process, 30)
    assert process.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        "relayq-router: RELAYQ_ROUTER_ID=held/2: another running router uses this id (its"
        " database session holds the id's lock); give each router its own")
    assert "Traceback" not in err

    async def workers_gone() -> bool:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                     " application_name = 'relayq-router'"
                                     " AND datname = current_database()")
            return (await cur.fetchone() or [1])[0] == 0
    await eventually(workers_gone, within=10, what="worker 1 stopped with the service")
