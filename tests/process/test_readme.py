"""The README's "A first delivery by hand", run as a reader runs it, so it cannot drift from the
code: every block marked `<!-- runs: by-hand -->` (tests/readme.py), in README order, each
shell block in bash with the environment the blocks before it left (one terminal), against
services the blocks themselves start: real processes, a real Postgres database of this test's
own, a real webhook receiver.

What the reader's machine has that this one must not share, the test puts in its place
(DOCUMENTED, replaced in the blocks' text; the services' addresses, which the README leaves
at their defaults, through the environment): its own database, free loopback ports. What a
reader copies from an earlier block's output (the write key) is filled in from that output
(COPIED). A grpcurl command runs through tests/grpcurl.py, server reflection as grpcurl
uses it, when grpcurl is not installed (it has no Debian package).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import conninfo_to_dict

from relayq.ports import free_port
from tests import readme
from tests.databases import SERVER_DSN, drop_database
from tests.grpcurl import grpcurl
from tests.poll import wait_until

pytestmark = pytest.mark.process

# A person's copy of a value shown by an earlier block, and how to find it in the output.
COPIED = {"rq_wk_...": re.compile(r"rq_wk_[A-Za-z0-9_-]+")}


# A command left running in the background: `cmd &` (not `&&`), before a comment or the end.
_BACKGROUND = re.compile(r"[^&]&[ \t]*(#.*)?$", re.MULTILINE)


class Session:
    """One terminal: blocks run in order, each seeing the environment the last one left."""

    def __init__(self, cwd: Path, env: dict[str, str], documented: dict[str, str],
                 ports: dict[str, int]) -> None:
        self.cwd = cwd
        self.env = env
        self.documented = documented
        self.ports = ports
        # The database the blocks must use: the test's own (checked once they set it).
        self.database_url = ""
        self.output = ""
        # The process groups the blocks ran in: the services they started in the background
        # are in them too, and are stopped with them.
        self.groups: list[int] = []

    def text(self, code: str) -> str:
        for documented, ours in self.documented.items():
            code = code.replace(documented, ours)
        for placeholder, pattern in COPIED.items():
            if placeholder in code:
                shown = pattern.search(self.output)
                assert shown, f"no {placeholder} in what the blocks printed:\n{self.output}"
                code = code.replace(placeholder, shown.group(0))
        return code

    def shell(self, code: str, timeout: float = 60.0) -> str:
        """Run commands as a reader pasting them would: up to a line that needs a value
        printed earlier in the same block, then (with it filled in) the rest."""
        lines = code.splitlines(keepends=True)
        cut = next((i for i, line in enumerate(lines) if any(p in line for p in COPIED)), 0)
        out = ""
        for part in ("".join(lines[:cut]), "".join(lines[cut:])):
            if part.strip():
                out += self._bash(self.text(part), timeout)
        return out

    def _bash(self, code: str, timeout: float) -> str:
        number = len(self.groups)
        log_path = self.cwd / f"block-{number}.log"
        env_path = self.cwd / f"block-{number}.env"
        script = f"set -euo pipefail\ntrap 'env -0 > {shlex.quote(str(env_path))}' EXIT\n{code}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(["bash", "-c", script], cwd=self.cwd, env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(process.pid)
        status = process.wait(timeout)
        out = log_path.read_text(errors="replace")
        self.output += out
        assert status == 0, f"exit status {status} from\n{code}\n---\n{out}"
        self.env = dict(item.split("=", 1) for item in
                        env_path.read_text().split("\0") if "=" in item)
        return out

    def stop(self) -> None:
        """SIGTERM to every group (the services drain), then SIGKILL to what is left."""
        for group in self.groups:
            _signal(group, signal.SIGTERM)
        # Up to 20 s for them to drain; what is left then is killed.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(_signal(g, 0) for g in self.groups), within=20,
                       what="the README's services to exit")
        for group in self.groups:
            _signal(group, signal.SIGKILL)


def _signal(group: int, sig: int) -> bool:
    """Send `sig` to a process group of ours; False when none of it is left."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    if shutil.which("createdb") is None:
        pytest.skip("the README's first block runs createdb (PostgreSQL's client programs)")
    server = conninfo_to_dict(SERVER_DSN)
    database = f"relayq_readme{os.getpid()}_{os.urandom(4).hex()}"
    ports = {name: free_port() for name in ("ingest", "admin", "router", "sink")}
    # The reader runs the blocks from the repository root, whose .venv the first block puts
    # on PATH; here the blocks run in a folder of the test's own (send.py, rejected.jsonl go
    # there), whose .venv is the one running the tests.
    (tmp_path / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    host, port, user = (server.get("host", "127.0.0.1"), server.get("port", "5432"),
                        server.get("user", "postgres"))
    dsn = f"postgresql://{user}@{host}:{port}/{database}"  # a URL: one shell word
    documented = {
        "postgresql://postgres@127.0.0.1:5432/relayq": dsn,
        "createdb -h 127.0.0.1 -U postgres relayq": f"createdb -h {host} -p {port} -U {user}"
                                                    f" {database}",
        "--port 8090": f"--port {ports['sink']}",
        "127.0.0.1:8090": f"127.0.0.1:{ports['sink']}",
        "127.0.0.1:50051": f"127.0.0.1:{ports['ingest']}",
    }
    # Each replacement must stay one word of the shell's: a value it split (a key=value DSN
    # in `export RELAYQ_DATABASE_URL=...`) would point the services at another database.
    for value in documented.values():
        assert all(shlex.quote(word) == word for word in value.split(" ")), value
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RELAYQ_", "PG"))}
    if "password" in server:
        env["PGPASSWORD"] = server["password"]
    for name in ("ingest", "admin", "router"):
        env[f"RELAYQ_{name.upper()}_ADDRESS"] = f"127.0.0.1:{ports[name]}"
        env[f"RELAYQ_{name.upper()}_METRICS_ADDRESS"] = "off"
    env.update({"RELAYQ_INGEST_WORKERS": "1", "RELAYQ_ROUTER_WORKERS": "1",
                "RELAYQ_ROUTER_LEASE_SECONDS": "3", "RELAYQ_ROUTER_POLL_SECONDS": "0.5",
                "RELAYQ_MAINTENANCE": "false", "RELAYQ_SHUTDOWN_GRACE_SECONDS": "5"})
    running = Session(tmp_path, env, documented, ports)
    running.database_url = dsn
    try:
        yield running
    finally:
        running.stop()
        drop_database(database)


def test_the_readme_by_hand_section_runs_as_written(session: Session) -> None:
    blocks = readme.blocks("by-hand")
    assert [b.lang for b in blocks] == ["sh", "sh", "python", "sh", "sh", "sh", "sh"]
    ports = session.ports
    # Every documented value is there to be replaced: were one to change in the README and
    # not here, the blocks would run against the reader's database and ports, not ours.
    missing = [value for value in session.documented
               if not any(value in block.code for block in blocks)]
    assert not missing, f"the README's blocks no longer say {missing}: update `documented`"
    outputs = []
    for block in blocks:
        if block.file is not None:
            (session.cwd / block.file).write_text(session.text(block.code))
            outputs.append("")
        elif block.code.startswith("grpcurl ") and shutil.which("grpcurl") is None:
            argv = shlex.split(session.text(block.code))
            answer = grpcurl(argv, None, {f"127.0.0.1:{ports['ingest']}":
                                          f"127.0.0.1:{ports['ingest']}"}, session.env)
            outputs.append(orjson.dumps(answer).decode())
        else:
            outputs.append(session.shell(block.code))
            assert session.env.get("RELAYQ_DATABASE_URL") == session.database_url
        if _BACKGROUND.search(block.code):
            # Started services in the background: a reader waits for their logs to say so.
            for name in ("ingest", "admin", "router"):
                wait_until(lambda n=name: _serving(f"127.0.0.1:{ports[n]}"), within=30,
                           what=f"relayq-{name} serving:\n{session.output}")
            wait_until(lambda: _listening(ports["sink"]), within=30, what="the demo sink")
    _, configured, _, sent, sent_lines, watched, grpcurled = outputs
    assert "write key" in configured
    assert sent.strip() == "ACCEPTED"
    assert "accepted           2" in sent_lines
    assert "hooks" in watched
    if shutil.which("grpcurl") is None:
        assert orjson.loads(grpcurled)["results"][0]["status"] == "ACCEPTED"

    def delivered() -> int:
        with socket.create_connection(("127.0.0.1", ports["sink"]), timeout=5) as sock:
            sock.sendall(b"GET /stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        stats = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        return int(stats["healthy"].get("delivered", 0))

    # One event from send.py, two from relayq send, one from grpcurl: all at the webhook.
    wait_until(lambda: delivered() == 4, within=30,
               what=lambda: f"4 deliveries (saw {delivered()}):\n{session.output}")
