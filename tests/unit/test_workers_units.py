"""The pieces of running several workers that need no process: how many, the port they
share, the restart policy, their ids."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest_service.config import IngestConfig
from relayq import addresses, cpus, worker
from relayq.config import MAX_WORKERS, ConfigError, Env, workers
from relayq.supervision import keeper
from router_service.config import RouterConfig, worker_id
from tests.helpers import TEST_SECRET_KEY


def test_the_cgroup_quota_caps_the_cpus_and_no_quota_leaves_them(tmp_path: Path) -> None:
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "quota", tmp_path / "period")
    assert cpus.quota_cpus(v2, v1) is None  # neither file: no cgroup limit to honour
    v2.write_text("max 100000\n")
    assert cpus.quota_cpus(v2, v1) is None
    v2.write_text("150000 100000\n")
    assert cpus.quota_cpus(v2, v1) == 2  # 1.5 CPUs' worth: two workers, each throttled a bit
    v2.write_text("20000 100000\n")
    assert cpus.quota_cpus(v2, v1) == 1
    v2.unlink()
    v1[0].write_text("-1\n")
    v1[1].write_text("100000\n")
    assert cpus.quota_cpus(v2, v1) is None
    v1[0].write_text("300000\n")
    assert cpus.quota_cpus(v2, v1) == 3


def test_usable_cpus_is_what_this_process_may_run_on() -> None:
    assert 1 <= cpus.usable() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("raw", "expected"), [("", None), ("auto", None), ("AUTO", None),
                                               ("1", 1), ("3", 3), (str(MAX_WORKERS),
                                                                    MAX_WORKERS)])
def test_workers_are_a_number_or_auto(raw: str, expected: int | None) -> None:
    got = workers(Env({"RELAYQ_INGEST_WORKERS": raw}), "RELAYQ_INGEST_WORKERS", "auto")
    assert got == (expected if expected is not None else min(MAX_WORKERS, cpus.usable()))


@pytest.mark.parametrize(("raw", "says"), [
    ("0", "0 is outside 1..64"), ("65", "65 is outside 1..64"),
    ("many", "expected a whole number or auto, got 'many'"),
    ("-2", "expected a whole number or auto, got '-2'")])
def test_a_bad_worker_count_names_the_variable(raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        workers(Env({"RELAYQ_ROUTER_WORKERS": raw}), "RELAYQ_ROUTER_WORKERS", "1")
    assert str(refused.value) == f"RELAYQ_ROUTER_WORKERS: {says}"


def test_ingest_defaults_to_a_worker_per_cpu_and_the_router_to_one() -> None:
    env = {"RELAYQ_DATABASE_URL": "postgresql://x@127.0.0.1/x",
           "RELAYQ_SECRET_KEYS": TEST_SECRET_KEY}
    assert IngestConfig.from_env(Env(env)).workers == min(MAX_WORKERS, cpus.usable())
    assert RouterConfig.from_env(Env(env)).workers == 1


def test_each_router_worker_has_its_own_stable_id() -> None:
    env = {"RELAYQ_DATABASE_URL": "postgresql://x@127.0.0.1/x",
           "RELAYQ_ROUTER_ADDRESS": "127.0.0.1:50053", "RELAYQ_SECRET_KEYS": TEST_SECRET_KEY}
    config = RouterConfig.from_env(Env(env))
    assert config.engine.router_id == f"{socket.gethostname()}:50053"
    assert worker_id(config.engine.router_id, 2) == f"{socket.gethostname()}:50053/2"


def test_restarts_back_off_after_quick_deaths_and_give_up_after_five() -> None:
    assert keeper.restart_delay(0) == 0.0  # it had run a while: at once
    assert [keeper.restart_delay(n) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert keeper.restart_delay(keeper.GIVE_UP_AFTER) is None


def test_a_process_is_a_worker_only_with_its_number() -> None:
    assert worker.index({}) is None
    assert worker.index({worker.INDEX: "2"}) == 2
    assert not worker.Link({worker.PIPE: "5"}).is_worker  # a stray pipe alone is nothing
    worker.Link({}).failed("nobody listens")  # and an inert link says nothing


@pytest.fixture
def reserved() -> Iterator[addresses.Reservation]:
    reservation = addresses.reserve("RELAYQ_INGEST_ADDRESS", "127.0.0.1:0")
    yield reservation
    reservation.close()


def _bind(port: int, *, reuseport: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def test_a_reserved_port_takes_its_workers_and_nobody_else(
        reserved: addresses.Reservation) -> None:
    host, port = addresses.split(reserved.address)
    assert host == "127.0.0.1"
    assert port > 0  # asked for port 0: the one the system chose
    with pytest.raises(OSError, match="Address already in use") as refused:
        _bind(port, reuseport=False)
    assert refused.value.errno == errno.EADDRINUSE
    addresses.check("RELAYQ_INGEST_ADDRESS", reserved.address, shared=True)
    with pytest.raises(addresses.AddressUnusable):
        addresses.check("RELAYQ_INGEST_ADDRESS", reserved.address)
    first, second = _bind(port, reuseport=True), _bind(port, reuseport=True)
    with first, second:
        first.listen()
        second.listen()  # two workers listening on one port
        with pytest.raises(OSError, match="Address already in use"):
            _bind(port, reuseport=False).listen()


def test_a_port_a_sharing_server_listens_on_cannot_be_reserved() -> None:
    """A gRPC server sets SO_REUSEPORT by default; reserving (with SO_REUSEPORT) would join
    it, so the plain check comes first."""
    with _bind(0, reuseport=True) as other:
        other.listen()
        address = f"127.0.0.1:{other.getsockname()[1]}"
        with pytest.raises(addresses.AddressUnusable) as refused:
            addresses.reserve("RELAYQ_ROUTER_ADDRESS", address)
    assert str(refused.value) == f"RELAYQ_ROUTER_ADDRESS={address}: address already in use"
