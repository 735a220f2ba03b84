"""Starting relayq services for tests: in-process (fast) or as real processes (kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from admin_service.config import AdminConfig
from admin_service.main import AdminApp
from ingest_service.config import IngestConfig
from ingest_service.main import IngestApp
from relayq.config import Env
from relayq.ports import free_port
from relayq.v1 import admin_pb2_grpc, ingest_pb2_grpc, router_pb2_grpc
from router_service.config import RouterConfig
from router_service.main import RouterApp
from tests.helpers import LOOPBACK_NETWORKS, TEST_SECRET_KEY
from tests.poll import wait_until

# The operator token every test admin server is started with.
OPERATOR_TOKEN = "test-operator-token-0123456789"


def quiet_env(database_url: str, **extra: str) -> dict[str, str]:
    """Settings for a service under test: loopback port 0, no metrics, no maintenance loop,
    one process (whatever the machine's CPUs: the workers' own tests ask for them), and a
    router tuned to react within a second (short leases, frequent polls)."""
    return {
        "RELAYQ_DATABASE_URL": database_url,
        "RELAYQ_INGEST_ADDRESS": "127.0.0.1:0",
        "RELAYQ_INGEST_METRICS_ADDRESS": "off",
        "RELAYQ_ROUTER_ADDRESS": "127.0.0.1:0",
        "RELAYQ_ROUTER_METRICS_ADDRESS": "off",
        "RELAYQ_ADMIN_ADDRESS": "127.0.0.1:0",
        "RELAYQ_ADMIN_METRICS_ADDRESS": "off",
        "RELAYQ_ADMIN_TOKEN": OPERATOR_TOKEN,
        "RELAYQ_ROUTER_LEASE_SECONDS": "3",
        "RELAYQ_ROUTER_POLL_SECONDS": "0.5",
        "RELAYQ_MAINTENANCE": "false",
        "RELAYQ_SHUTDOWN_GRACE_SECONDS": "5",
        "RELAYQ_INGEST_WORKERS": "1",
        "RELAYQ_ROUTER_WORKERS": "1",
        # Destinations under test are on this machine, which the network policy refuses by
        # default (relayq.netpolicy): allow loopback, and only loopback.
        "RELAYQ_DESTINATION_ALLOW_NETWORKS": LOOPBACK_NETWORKS,
        # Secrets are sealed at rest; routers and admin need the key (jobsdb.sealing).
        "RELAYQ_SECRET_KEYS": TEST_SECRET_KEY,
        **extra,
    }


@dataclass
class Ingest:
    app: IngestApp
    channel: grpc.aio.Channel
    stub: ingest_pb2_grpc.IngestStub


@asynccontextmanager
async def ingest(database_url: str, **extra: str) -> AsyncIterator[Ingest]:
    app = await IngestApp.start(IngestConfig.from_env(Env(quiet_env(database_url, **extra))))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Ingest(app, channel, ingest_pb2_grpc.IngestStub(channel))
    finally:
        await channel.close()
        await app.stop()


@dataclass
class Router:
    app: RouterApp
    channel: grpc.aio.Channel
    status: router_pb2_grpc.RouterStatusStub


@asynccontextmanager
async def router(database_url: str, **extra: str) -> AsyncIterator[Router]:
    app = await RouterApp.start(RouterConfig.from_env(Env(quiet_env(database_url, **extra))))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Router(app, channel, router_pb2_grpc.RouterStatusStub(channel))
    finally:
        await channel.close()
        await app.stop()


@dataclass
class Admin:
    app: AdminApp
    channel: grpc.aio.Channel
    stub: admin_pb2_grpc.AdminStub

    @staticmethod
    def auth(token: str = OPERATOR_TOKEN) -> tuple[tuple[str, str]]:
        """Call metadata carrying an admin token (the operator's by default)."""
        return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def admin(database_url: str, **extra: str) -> AsyncIterator[Admin]:
    app = await AdminApp.start(AdminConfig.from_env(Env(quiet_env(database_url, **extra))))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        yield Admin(app, channel, admin_pb2_grpc.AdminStub(channel))
    finally:
        await channel.close()
        await app.stop()


class ServiceProcess:
    """A service run as its own process with `python -m`, on a port chosen up front."""

    def __init__(self, module: str, env: Mapping[str, str], port: int) -> None:
        self.port = port
        # A file, not a pipe: a chatty process must never block on a full pipe buffer.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"import {module}; {module}.main()"],
            env={**os.environ, **env, "RELAYQ_LOG_FORMAT": "json"},
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early: {self.stderr()}")
            channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return True
            except grpc.FutureTimeoutError:
                return False
            finally:
                channel.close()

        wait_until(ready, within=timeout, every=0,
                   what=lambda: f"service on port {self.port} ready: {self.stderr()}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def workers(self) -> list[int]:
        """The pids of its workers (RELAYQ_*_WORKERS above 1), from /proc (Linux)."""
        return children(self.process.pid)

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


def children(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def router_process(database_url: str, *, port: int | None = None, wait: bool = True,
                   **extra: str) -> ServiceProcess:
    """A router on `port` (a free one by default; the same port again is the same router id,
    as a restart on the same host with the same configuration would be)."""
    port = port or free_port()
    env = quiet_env(database_url, RELAYQ_ROUTER_ADDRESS=f"127.0.0.1:{port}", **extra)
    service = ServiceProcess("router_service.main", env, port)
    if wait:
        service.wait_ready()
    return service


def ingest_process(database_url: str, **extra: str) -> ServiceProcess:
    port = free_port()
    env = quiet_env(database_url, RELAYQ_INGEST_ADDRESS=f"127.0.0.1:{port}", **extra)
    service = ServiceProcess("ingest_service.main", env, port)
    service.wait_ready()
    return service


def admin_process(database_url: str, **extra: str) -> ServiceProcess:
    port = free_port()
    env = quiet_env(database_url, RELAYQ_ADMIN_ADDRESS=f"127.0.0.1:{port}", **extra)
    service = ServiceProcess("admin_service.main", env, port)
    service.wait_ready()
    return service


def launch(module: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """A service's main() with `env` alone of the RELAYQ_ and PG variables, its output piped."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYQ_", "PG"))}
    return subprocess.Popen(
        [sys.executable, "-c", f"import {module} as m; m.main()"],
        env={**clean, **env, "RELAYQ_LOG_FORMAT": "json"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Its output once it exits; killed (and the test failed) if it does not in time."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"still running after {timeout}s")


def finish_stderr(process: subprocess.Popen[str], timeout: float) -> str:
    return finish(process, timeout)[1]
