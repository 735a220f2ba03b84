"""The processes `relayq up` runs: started in their own session, watched, stopped in order.

Each child gets its own session so that Ctrl-C on the terminal reaches only `relayq up`,
which then stops the children itself, traffic first and the database last, rather than
every process at once (routers would then fail their last writes against a database
already shutting down). The parent-death signal covers the other case: if `relayq up` is
killed outright, its children get SIGTERM and drain on their own.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relayq.worker import die_with_parent


class ChildFailed(Exception):
    """A child process exited when it should not have. The message has its last log lines."""


def python(module: str, function: str = "main") -> list[str]:
    """A command running `module.function()` with this interpreter."""
    return [sys.executable, "-c", f"from {module} import {function}; {function}()"]


class Child:
    """One process, its output in a log file (never a pipe: nobody reads it while it runs)."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str],
                 log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("ab")
        self.process = subprocess.Popen(
            list(command), env=dict(env), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM))

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self) -> ChildFailed:
        return ChildFailed(f"{self.name} exited with status {self.process.returncode};"
                           f" the end of {self.log_path}:\n{self.tail()}")

    async def wait_serving(self, address: str, within: float = 60.0) -> None:
        """Until the gRPC health service says SERVING (the process has migrated, bound,
        started its loops)."""
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.running():
                    raise self.failure()
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise ChildFailed(f"{self.name} did not become ready within {within:.0f}s;"
                                      f" the end of {self.log_path}:\n{self.tail()}")
                await asyncio.sleep(0.2)

    async def wait_http(self, url: str, within: float = 30.0) -> None:
        import aiohttp

        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while True:
                if not self.running():
                    raise self.failure()
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise ChildFailed(f"{self.name} did not answer {url} within {within:.0f}s")
                await asyncio.sleep(0.2)

    async def stop(self, grace: float) -> int:
        """SIGTERM (the services drain), then SIGKILL after `grace` seconds."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Polling: a Popen child's exit sets no event the loop could wait on.
        while self.running() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.running():
            self.process.kill()
        code = self.process.wait()
        self._log.close()
        return code
