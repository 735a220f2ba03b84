"""The supervisor's loop: prepare once, start every worker, restart the ones that die (with
a backoff for those that die starting, giving up after GIVE_UP_AFTER in a row), and drain
them all on SIGTERM or SIGINT (relayq.supervisor says what, and why)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any, Generic

from jobsdb.errors import JobsDBError
from relayq.supervision import metrics
from relayq.supervision.children import WorkerProcess
from relayq.supervision.plan import Config, Plan

log = logging.getLogger("relayq.supervisor")

# A worker that dies within this many seconds of its start died starting ...
QUICK_SECONDS = 10.0
# ... and this many such deaths in a row of one worker make the supervisor give up.
GIVE_UP_AFTER = 5
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
# Past the drain deadline, how long a worker gets to exit by itself (it exits 1 at the same
# deadline, saying so) before it is killed.
KILL_AFTER_SECONDS = 2.0


def restart_delay(quick_deaths: int) -> float | None:
    """How long to wait before starting a worker again after `quick_deaths` deaths in a row
    within QUICK_SECONDS of its start (0: it had run a while); None: give up."""
    if quick_deaths >= GIVE_UP_AFTER:
        return None
    if quick_deaths == 0:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2.0 ** (quick_deaths - 1))


class Keeper(Generic[Config]):
    def __init__(self, name: str, plan: Plan[Config], config: Config,
                 environs: list[dict[str, str]], timeout: float, directory: str | None
                 ) -> None:
        self.name = name
        self.plan = plan
        self.config = config
        self.timeout = timeout
        self.directory = directory
        self.workers = [WorkerProcess(index, environ) for index, environ in
                        enumerate(environs, start=1)]
        metrics.counts.workers = self.workers
        self.stop = asyncio.Event()
        self.failed = asyncio.Event()
        self.failure = (0, "")
        self.serving = False

    @property
    def ending(self) -> bool:
        return self.stop.is_set() or self.failed.is_set()

    async def run(self) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        failure = await self._prepare()
        if failure is not None:
            return failure
        keepers = [asyncio.create_task(self._keep(w), name=f"worker-{w.index}")
                   for w in self.workers]
        everyone = asyncio.ensure_future(self._all_ready())
        await self._until(everyone)
        if everyone.done() and not self.ending:
            self.serving = True
            log.info("serving", extra={"service": self.name, "workers": len(self.workers),
                                       "address": self.config.server.address,
                                       "pids": ",".join(str(w.process.pid) for w in self.workers
                                                        if w.process is not None)})
        everyone.cancel()
        await self._until()
        return await self._drain(keepers)

    async def _all_ready(self) -> None:
        for w in self.workers:
            await w.ready.wait()

    async def _until(self, *also: asyncio.Future[Any]) -> None:
        """Until a signal, a failure, or any of `also`."""
        waits = {asyncio.ensure_future(self.stop.wait()),
                 asyncio.ensure_future(self.failed.wait())}
        await asyncio.wait(waits | set(also), return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()

    async def _prepare(self) -> tuple[int, str] | None:
        """Postgres waited for, the schema migrated or checked; else why the service ends."""
        preparing = asyncio.ensure_future(self.plan.prepare(self.config))
        await self._until(preparing)
        if not preparing.done():
            log.info("stopping before start finished", extra={"service": self.name})
            preparing.cancel()
            await asyncio.wait({preparing}, timeout=self.timeout)
            return 0, ""
        failure = preparing.exception()
        if failure is None:
            return None
        if isinstance(failure, JobsDBError):
            return 1, f"{self.name}: {failure}"
        log.error("could not start", exc_info=failure, extra={"service": self.name})
        return 1, f"{self.name}: could not start: {failure!r}"

    async def _keep(self, w: WorkerProcess) -> None:
        """Keep worker `w` running until the service ends."""
        loop = asyncio.get_running_loop()
        while not self.ending:
            try:
                await w.start(self.plan.module)
            except OSError as exc:
                code, w.last_words = 1, f"{self.name}: cannot start a worker: {exc}"
            else:
                if self.ending:  # stopped while it was being started: _drain missed it
                    w.signal(signal.SIGTERM)
                code = await w.ended()
                assert w.process is not None
                if self.directory is not None:
                    metrics.mark_dead(w.process.pid, self.directory)
            if self.ending:
                return
            what = f"worker {w.index} {w.describe(code)}"
            if not self.serving:
                self._fail(code if code in (1, 2) else 1,
                           w.last_words or f"{self.name}: {what} while starting")
                return
            lived = loop.time() - w.started
            w.quick_deaths = w.quick_deaths + 1 if lived < QUICK_SECONDS else 0
            delay = restart_delay(w.quick_deaths)
            if delay is None:
                self._fail(1, f"{self.name}: {what}, the {GIVE_UP_AFTER}th time in a row within"
                              f" {QUICK_SECONDS:g}s of its start; giving up"
                              + (f" (its last words: {w.last_words})" if w.last_words else ""))
                return
            log.error("%s; restarting it in %gs", what, delay,
                      extra={"service": self.name, "worker": w.index, "status": code,
                             "last_words": w.last_words, "ran_seconds": round(lived, 1)})
            metrics.counts.restarts += 1
            await self._until(asyncio.ensure_future(asyncio.sleep(delay)))

    def _fail(self, status: int, message: str) -> None:
        if not self.failed.is_set():
            self.failure = (status, message)
            self.failed.set()

    async def _drain(self, keepers: list[asyncio.Task[None]]) -> tuple[int, str]:
        log.info("shutting down", extra={"service": self.name, "workers": len(self.workers)})
        for w in self.workers:
            w.signal(signal.SIGTERM)
        _, late = await asyncio.wait(keepers, timeout=self.timeout + KILL_AFTER_SECONDS)
        if late:
            for w in self.workers:
                if w.running:
                    log.error("worker %d still running %gs after RELAYQ_SHUTDOWN_TIMEOUT_SECONDS;"
                              " killing it", w.index, KILL_AFTER_SECONDS,
                              extra={"service": self.name, "worker": w.index})
                    w.signal(signal.SIGKILL)
            await asyncio.wait(keepers)
        for keeper in keepers:
            if keeper.exception() is not None:
                log.error("watching a worker failed", exc_info=keeper.exception(),
                          extra={"service": self.name})
                self._fail(1, "")
        if self.failed.is_set():
            return self.failure
        # A worker our SIGTERM found still importing had nothing to drain.
        unclean = {w.index: code for w in self.workers
                   if (code := w.exit_status) not in (0, -signal.SIGTERM)}
        if unclean:
            log.error("not every worker drained cleanly", extra={
                "service": self.name,
                "workers": ",".join(f"{i}:{code}" for i, code in unclean.items())})
            return 1, ""
        return 0, ""

    def _signalled(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            self.stop.set()
            return
        log.warning("%s again: exiting at once (the workers are killed)", sig.name,
                    extra={"service": self.name})
        for w in self.workers:
            w.signal(signal.SIGKILL)
        if self.directory is not None:  # dying of the signal skips run()'s cleaning up
            metrics.remove(self.directory)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # pragma: no cover - the signal ends the process first
