"""Every service stops when it should: a port it cannot bind, SIGTERM at any moment, a drain
that does not finish, a second signal. Real processes, real signals."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import psycopg
import pytest

from ingest_service.config import IngestConfig
from ingest_service.main import IngestApp
from relayq import addresses, server
from relayq.config import Env
from relayq.v1 import ingest_pb2, ingest_pb2_grpc
from tests import factories
from tests.helpers import auth, event
from tests.poll import eventually, wait_until
from tests.services import finish, gone, ingest_process, launch, quiet_env

SERVICES = [("ingest", "ingest_service.main"), ("admin", "admin_service.main"),
            ("router", "router_service.main")]


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.process
@pytest.mark.parametrize("which", ["grpc", "metrics"])
@pytest.mark.parametrize(("service", "module"), SERVICES, ids=[s for s, _ in SERVICES])
def test_a_taken_port_stops_the_service_at_once_naming_the_variable(
        database: str, taken: int, service: str, module: str, which: str) -> None:
    variable = f"RELAYQ_{service.upper()}_{'ADDRESS' if which == 'grpc' else 'METRICS_ADDRESS'}"
    address = f"127.0.0.1:{taken}"
    started = time.monotonic()
    process = launch(module, quiet_env(database, **{variable: address}))
    _, err = finish(process, 30)
    took = time.monotonic() - started
    assert process.returncode == 1, err
    assert err.strip().splitlines() == [
        f"relayq-{service}: {variable}={address}: address already in use"]
    assert took < 2.0 + 1.5, f"took {took:.1f}s"  # 2 s, plus the interpreter's start


async def test_a_port_taken_after_the_check_still_stops_everything_the_app_started(
        database: str, taken: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC's own bind fails late, after pools, the listener and the committer started: they
    must all stop, or their tasks keep the process alive (psycopg_pool's workers ignore a
    second-hand cancellation)."""
    monkeypatch.setattr(server, "check_addresses", lambda config: None)
    env = Env(quiet_env(database, RELAYQ_INGEST_ADDRESS=f"127.0.0.1:{taken}"))
    before = asyncio.all_tasks()
    with pytest.raises(addresses.AddressUnusable) as refused:
        await IngestApp.start(IngestConfig.from_env(env))
    assert str(refused.value).startswith(f"RELAYQ_INGEST_ADDRESS=127.0.0.1:{taken}: address")
    left = {t for t in asyncio.all_tasks() if t not in before and not t.done()}
    assert left == set(), [t.get_name() for t in left]


@pytest.mark.process
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_while_waiting_for_postgres_stops_at_once(workers: str) -> None:
    """With workers, their supervisor waits for Postgres before starting any."""
    process = launch("ingest_service.main", quiet_env(
        "postgresql://postgres@127.0.0.1:9/none", RELAYQ_LOG_LEVEL="info",
        RELAYQ_INGEST_WORKERS=workers))
    assert process.stderr is not None
    # Until it says it waits: the signal must land in the wait, not before the handlers.
    for line in process.stderr:
        if "waiting for Postgres" in line:
            break
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    finish(process, 10)
    assert process.returncode == 0
    assert time.monotonic() - started < 2.0


async def _stuck_ingest(database: str, web: factories.Source, **extra: str
                        ) -> tuple[Any, psycopg.Connection[Any], asyncio.Task[Any]]:
    """An ingest process whose one request in flight waits on a lock held by the test."""
    service = ingest_process(database, RELAYQ_SHUTDOWN_GRACE_SECONDS="0.5", **extra)
    blocker = psycopg.connect(database)
    blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    call = asyncio.ensure_future(ingest_pb2_grpc.IngestStub(channel).Ingest(
        ingest_pb2.IngestRequest(events=[event("m1")]), metadata=auth(web.write_key),
        timeout=30))
    await eventually(lambda: _waiting_for_lock(database), within=10, every=0.05,
                     what="the flush waiting on the lock")
    return service, blocker, call


def _waiting_for_lock(database: str) -> bool:
    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                           " AND application_name = 'relayq-ingest'").fetchone()
        return bool(row and row[0])


@pytest.mark.process
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_drain_past_the_deadline_exits_non_zero_with_nothing_acknowledged_lost(
        database: str, web: factories.Source, workers: str) -> None:
    """With workers, the one stuck exits 1 at the deadline, and so does their supervisor."""
    service, blocker, call = await _stuck_ingest(
        database, web, RELAYQ_SHUTDOWN_TIMEOUT_SECONDS="2", RELAYQ_INGEST_WORKERS=workers)
    try:
        started = time.monotonic()
        code = service.terminate(timeout=15)
        took = time.monotonic() - started
        assert code == 1, service.stderr()
        assert 1.5 < took < 5, took
        assert "RELAYQ_SHUTDOWN_TIMEOUT_SECONDS=2s" in service.stderr()
        # The request was never acknowledged; nothing was stored.
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        blocker.rollback()
        assert blocker.execute("SELECT count(*) FROM events").fetchone() == (0,)
    finally:
        blocker.close()
        service.close()


@pytest.mark.process
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_second_sigterm_ends_a_drain_at_once(
        database: str, web: factories.Source, workers: str) -> None:
    """With workers, their supervisor kills them: none is left behind."""
    # The default 30 s deadline.
    service, blocker, call = await _stuck_ingest(database, web, RELAYQ_INGEST_WORKERS=workers)
    children = service.workers()
    assert len(children) == (0 if workers == "1" else 2)
    try:
        service.process.send_signal(signal.SIGTERM)
        await eventually(lambda: "shutting down" in service.stderr(), within=10, every=0.05,
                         what=service.stderr)
        started = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(5) == -signal.SIGTERM
        assert time.monotonic() - started < 1.0
        assert "SIGTERM again: exiting at once" in service.stderr()
        wait_until(lambda: all(gone(pid) for pid in children), within=5,
                   what="the workers killed")
        call.cancel()
    finally:
        blocker.close()
        service.close()
