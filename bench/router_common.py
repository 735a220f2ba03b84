"""What the router benchmarks share: the sink process that notes arrivals, how services stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import dsn_for, free_port

QUIET = {"RELAYQ_MAINTENANCE": "false", "RELAYQ_INGEST_METRICS_ADDRESS": "off",
         "RELAYQ_ROUTER_METRICS_ADDRESS": "off"}


class Sink:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.out = Path(tempfile.mkstemp(prefix="relayq-sink-")[1])
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "sink.py"), "--kind", kind,
             "--port", str(self.port), "--out", str(self.out)])
        time.sleep(1.0)

    @property
    def endpoint(self) -> str:
        return (f"127.0.0.1:{self.port}" if self.kind == "grpc"
                else f"http://127.0.0.1:{self.port}/hook")

    def arrivals(self) -> dict[str, float]:
        """Stop the sink and read when each message first arrived."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        seen: dict[str, float] = {}
        for line in self.out.read_text().splitlines():
            message_id, when = line.split()
            seen.setdefault(message_id, float(when))
        self.out.unlink()
        return seen


def wait_recorded(name: str, jobs: int, within: float = 900) -> float:
    """Until every job's success is counted (delivery_counts, what the router counts for
    GetStats: cheap to read, unlike scanning the jobs); returns when (time.time)."""
    deadline = time.monotonic() + within
    with psycopg.connect(dsn_for(name), autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT coalesce(sum(succeeded), 0) FROM delivery_counts"
                               ).fetchone()
            if row and row[0] >= jobs:
                return time.time()
            time.sleep(0.05)
    raise SystemExit(f"not all {jobs} jobs were recorded in time")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


