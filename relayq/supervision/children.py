"""One worker process as its supervisor sees it: started with its own environment and the
write end of a pipe, on which it says it is ready or the one line on why it stopped
(relayq.worker is the other end)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from relayq import worker

# How long the pipe of a worker that exited may take to give its last line.
_LAST_WORDS_SECONDS = 1.0


class WorkerProcess:
    def __init__(self, index: int, environ: dict[str, str]) -> None:
        self.index = index
        self.environ = environ
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ready = asyncio.Event()
        # The worker's one line on why it stopped (relayq.worker.Link.failed).
        self.last_words = ""
        self.quick_deaths = 0
        self._listening: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def start(self, module: str) -> None:
        self.ready.clear()
        self.last_words = ""
        read_end, write_end = os.pipe()
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", f"import {module} as m; m.main()",
                env={**self.environ, worker.PIPE: str(write_end)},
                stdin=subprocess.DEVNULL, pass_fds=(write_end,))
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.started = asyncio.get_running_loop().time()
        self._listening = asyncio.create_task(self._listen(read_end),
                                              name=f"worker-{self.index}-pipe")

    async def _listen(self, read_end: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", buffering=0))
        try:
            async for raw in reader:
                line = raw.decode(errors="replace").strip()
                if line == worker.READY:
                    self.ready.set()
                elif line.startswith(worker.FAILED):
                    self.last_words = line[len(worker.FAILED):]
        finally:
            transport.close()

    async def ended(self) -> int:
        """Wait for the process to exit, and for what it said on the way out."""
        assert self.process is not None
        code = await self.process.wait()
        self.ready.clear()
        if self._listening is not None:
            await asyncio.wait({self._listening}, timeout=_LAST_WORDS_SECONDS)
            self._listening.cancel()
        return code

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)

    def describe(self, code: int) -> str:
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"
