"""`relayq up` as a user runs it (a real subprocess, an embedded Postgres, real signals), and
its parts: port choice, the demo sink's order check, the progress view.

Each process test reads the cluster's addresses and operator token from cluster.json (written once
the demo is configured), asks the admin API what happened, and after the signal checks that
every process `relayq up` started, the embedded Postgres and its backends included, is gone.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import grpc
import psutil
import pytest

from relayq.demo import progress
from relayq.demo.sink import Endpoint
from relayq.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers import auth
from tests.poll import wait_until


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    root: Path

    @property
    def info_path(self) -> Path:
        return self.root / ".relayq" / "cluster.json"

    def output(self) -> str:
        out = (self.root / "up.out").read_text(errors="replace")
        err = (self.root / "up.err").read_text(errors="replace")
        return f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"

    def wait_info(self, within: float = 120.0) -> dict[str, Any]:
        def written() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"relayq up exited with {self.process.returncode}\n{self.output()}")
            return self.info_path.exists()

        wait_until(written, within=within, every=0.2,
                   what=lambda: f"relayq up coming up\n{self.output()}")
        info: dict[str, Any] = json.loads(self.info_path.read_text())
        return info

    def tree(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def start_up(root: Path, *args: str, **env: str) -> Up:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAYQ_", "PG"))}
    environ.update(env)
    # Files, not pipes: nobody reads the output while it runs.
    with (root / "up.out").open("wb") as out, (root / "up.err").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", "from relayq.cli import main; main()", "up",
             "--free-ports", "--events-per-second", "40", "--grace", "10", *args],
            cwd=root, env=environ, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    return Up(process, root)


@pytest.fixture
def up_root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever a failed test left running (the tests below check that nothing is).
    for proc in psutil.process_iter(["cmdline"]):
        if str(tmp_path) in " ".join(proc.info["cmdline"] or ()):
            proc.kill()


def admin_stub(info: dict[str, Any]) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(info["addresses"]["admin"])
    return channel, admin_pb2_grpc.AdminStub(channel)


def wait_for_deliveries(stub: admin_pb2_grpc.AdminStub, token: str, up: Up,
                        within: float = 60.0) -> dict[str, admin_pb2.DestinationStats]:
    """Until both demo destinations have delivered, and the flaky one has failed some."""
    seen: dict[str, admin_pb2.DestinationStats] = {}

    def delivered() -> bool:
        nonlocal seen
        stats = stub.GetStats(admin_pb2.GetStatsRequest(tenant_id="demo"),
                              metadata=auth(token))
        seen = {d.destination_id: d for d in stats.destinations}
        healthy, flaky = seen.get("demo-healthy"), seen.get("demo-flaky")
        return bool(healthy and flaky and healthy.counts.succeeded >= 50
                    and flaky.counts.succeeded >= 20
                    and flaky.counts.failed + flaky.counts.waiting + flaky.counts.aborted > 0)

    wait_until(delivered, within=within, every=0.5,
               what=lambda: f"deliveries ({seen})\n{up.output()}")
    return seen


def assert_all_gone(procs: list[psutil.Process], within: float = 30.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=within)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


@pytest.mark.process
@pytest.mark.timeout(240)
def test_up_with_embedded_postgres_runs_delivers_and_stops_cleanly(up_root: Path) -> None:
    up = start_up(up_root)
    info = up.wait_info()
    assert "postgres" in info["pids"]
    data = up_root / ".relayq" / "pgdata"
    assert (data / "PG_VERSION").exists()
    assert (data / "postmaster.pid").exists()

    channel, stub = admin_stub(info)
    with channel:
        auth = (("authorization", f"Bearer {info['admin_token']}"),)
        wait_for_deliveries(stub, info["admin_token"], up)
        # The configuration was made through the admin API, and the jobs are queryable.
        connections = stub.ListConnections(
            admin_pb2.ListConnectionsRequest(source_id="demo-web"), metadata=auth)
        assert {c.destination_id for c in connections.connections} == {
            "demo-healthy", "demo-flaky"}
        jobs = stub.ListJobs(admin_pb2.ListJobsRequest(
            filter="destination = 'demo-flaky' AND attempts >= 2", page_size=5), metadata=auth)
        assert jobs.jobs, "the flaky destination should have retried something"
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetStats(admin_pb2.GetStatsRequest(),
                          metadata=(("authorization", "Bearer wrong"),))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    with urlopen(info["sink"] + "/stats", timeout=5) as resp:
        sink = json.loads(resp.read())
    assert sink["flaky"].get("failed", 0) > 0
    assert sink["healthy"].get("out_of_order", 0) == 0
    assert sink["flaky"].get("out_of_order", 0) == 0

    tree = up.tree()
    pids = {p.pid for p in tree}
    assert set(info["pids"].values()) <= pids
    assert len(tree) > len(info["pids"]), "postgres's own backends are in the tree too"

    up.process.send_signal(signal.SIGINT)
    assert up.process.wait(60) == 0, up.output()
    assert_all_gone(tree, within=5)
    assert not (data / "postmaster.pid").exists(), "postgres did not shut down cleanly"
    assert not up.info_path.exists()
    out = (up_root / "up.out").read_text()
    assert "stopped cleanly" in out
    assert "relayq.v1.Admin/GetStats" in out
    assert info["admin_token"] in out


@pytest.mark.process
@pytest.mark.timeout(240)
def test_up_on_an_existing_database_and_sigterm(up_root: Path, database: str) -> None:
    """RELAYQ_DATABASE_URL set: no embedded Postgres; SIGTERM stops it like Ctrl-C."""
    up = start_up(up_root, "--no-demo-traffic", RELAYQ_DATABASE_URL=database)
    info = up.wait_info()
    assert "postgres" not in info["pids"]
    assert info["database_url"] == database
    assert not (up_root / ".relayq" / "pgdata").exists()
    tree = up.tree()
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(60) == 0, up.output()
    assert_all_gone(tree, within=5)


@pytest.mark.process
@pytest.mark.timeout(240)
def test_up_still_stops_on_sigterm_once_its_output_pipe_is_gone(
        up_root: Path, database: str) -> None:
    """`make up | tee log`, then tee dies: the next write fails with EPIPE, and the signal
    handler, which wrote before it set the stop flag, made `relayq up` deaf to signals."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYQ_", "PG"))}
    (up_root / "up.out").write_text("(a pipe)\n")
    with (up_root / "up.err").open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", "from relayq.cli import main; main()", "up",
             "--free-ports", "--no-demo-traffic", "--grace", "10"],
            cwd=up_root, env={**environ, "RELAYQ_DATABASE_URL": database},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    up = Up(process, up_root)
    try:
        up.wait_info()
        tree = up.tree()
        assert process.stdout is not None
        process.stdout.close()  # the reader is gone: the next write fails
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, up.output()
        assert_all_gone(tree, within=5)
        assert "Traceback" not in (up_root / "up.err").read_text()
    finally:
        # Deaf to signals, it would outlive the test (its command line names no folder for
        # up_root's clean-up to find); its children follow it by their parent-death signal.
        if process.poll() is None:
            process.kill()


@pytest.mark.process
@pytest.mark.timeout(240)
def test_children_go_when_up_is_killed(up_root: Path) -> None:
    """kill -9 leaves no time to clean up: the parent-death signal must do it."""
    up = start_up(up_root, "--no-demo-traffic")
    up.wait_info()
    tree = up.tree()
    up.process.kill()
    up.process.wait(10)
    assert_all_gone(tree, within=30)


# ---- the parts, without processes ----


def test_ports_fall_back_to_free_ones_when_a_default_is_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from relayq.cli import up as up_module

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(up_module, "DEFAULT_PORTS", {"ingest": busy, "admin": busy})
        ports = up_module.Ports.choose(any_port=False)
    assert ports.values["ingest"] != busy
    assert ports.values["admin"] != busy
    assert ports.values["ingest"] != ports.values["admin"]


def demo_event(run: str, user: str, seq: int) -> bytes:
    return json.dumps({"messageId": f"{run}-{seq}", "userId": user,
                       "properties": {"run": run, "seq": seq}}).encode()


def test_sink_counts_deliveries_out_of_order_per_user_and_run() -> None:
    rng = random.Random(1)
    endpoint = Endpoint(error_rate=0.0, reject_rate=0.0)
    for seq in (1, 2, 2, 4, 3):
        assert endpoint.answer(demo_event("r1", "ann", seq), rng) == 200
    endpoint.answer(demo_event("r1", "bob", 1), rng)  # another user: its own sequence
    endpoint.answer(demo_event("r2", "ann", 1), rng)  # another run numbers from 1 again
    endpoint.answer(b"not json", rng)
    assert endpoint.counts["delivered"] == 8
    assert endpoint.counts["redelivered"] == 1
    assert endpoint.counts["out_of_order"] == 1


def test_flaky_endpoint_fails_and_rejects_about_as_configured() -> None:
    rng = random.Random(7)
    endpoint = Endpoint(error_rate=0.2, reject_rate=0.05)
    answers = [endpoint.answer(demo_event("r", "u", n), rng) for n in range(2000)]
    assert 300 < answers.count(500) < 500
    assert 50 < answers.count(422) < 150
    assert answers.count(200) == endpoint.counts["delivered"]


def test_progress_table_and_line() -> None:
    stats = admin_pb2.DestinationStats(
        destination_id="demo-flaky", tenant_id="demo", delivered_per_second=12.5,
        counts=admin_pb2.StateCounts(pending=3, failed=2, waiting=5, succeeded=1234, aborted=1))
    snap = progress.Snapshot(75.0, {"accepted": 1300, "duplicates": 0, "errors": 0},
                             [stats], {"flaky": {"out_of_order": 0}})
    lines = progress.table(snap)
    assert lines[0].startswith("relayq up · 1m15s · events sent 1,300")
    header, row = lines[2].split(), lines[3].split()
    assert header[:3] == ["destination", "pending", "retrying"]
    assert row == ["demo-flaky", "3", "2", "5", "1,234", "1", "12.5"]
    assert progress.line(snap) == (
        "t=75s | sent=1300 | demo-flaky: pending=3 retrying=2 waiting=5 delivered=1234"
        " aborted=1 | out_of_order=0")


@pytest.mark.process
@pytest.mark.timeout(240)
def test_a_second_up_on_the_same_folder_refuses_and_leaves_the_first_alone(
        up_root: Path) -> None:
    first = start_up(up_root, "--no-demo-traffic")
    first.wait_info()
    second_root = up_root / "second"
    second_root.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYQ_", "PG"))}
    second = subprocess.run(
        [sys.executable, "-c", "from relayq.cli import main; main()", "up", "--free-ports",
         "--data-dir", str(up_root / ".relayq" / "pgdata")],
        cwd=second_root, env=environ, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 1
    assert "another relayq up is running" in second.stderr
    assert first.info_path.exists()
    assert first.process.poll() is None
    first.process.send_signal(signal.SIGINT)
    assert first.process.wait(60) == 0, first.output()
