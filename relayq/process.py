"""What every relayq service process does around its app: config, logs, signals, exit codes.

Exit status 2: bad configuration (the message names the variable); 1: the process could not
start (a listen address it cannot bind, a database that cannot be reached or refuses it, an
outdated schema) or did not finish draining within RELAYQ_SHUTDOWN_TIMEOUT_SECONDS; 0: a
clean shutdown after SIGTERM or SIGINT. A second SIGTERM or SIGINT ends the process at once,
killed by that signal.

A service that runs several workers (RELAYQ_INGEST_WORKERS, RELAYQ_ROUTER_WORKERS) becomes
their supervisor here (relayq.supervisor), with the same statuses; each worker is this same
main() again, told by its environment that it is one (relayq.worker).

No stop may hang the process. Draining has an overall deadline, and whatever background task
still runs once the app has stopped (a library's task that swallowed its cancellation, as
psycopg_pool's workers can on Python 3.11) is abandoned rather than waited for: asyncio's own
teardown would wait for it forever, deaf to signals. Leaving early loses nothing acknowledged:
ingest answers only after commit, and a router's unrecorded deliveries are made again by the
partition's next owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol

from jobsdb.errors import JobsDBError
from relayq import logs, runtime, supervisor
from relayq.addresses import AddressUnusable
from relayq.config import ConfigError, Env
from relayq.server import check_addresses
from relayq.supervisor import Config
from relayq.tasks import cancel_and_wait
from relayq.worker import Link

log = logging.getLogger(__name__)

# How long background tasks get to end once the app has stopped, before they are abandoned.
_LINGER_SECONDS = 1.0


class App(Protocol):
    async def stop(self) -> None: ...


def main(name: str, load: Callable[[Env], Config],
         start: Callable[[Config], Awaitable[App]],
         workers: supervisor.Plan[Config] | None = None) -> None:
    """Read the configuration, run the app until a signal, stop it within the deadline; or,
    when `workers` says there are to be several, supervise them."""
    global _link
    env = Env()
    link = _link = Link()
    try:
        config = load(env)
        logs.configure_from_env(env, {"worker": link.index} if link.is_worker else None)
        timeout = env.number("RELAYQ_SHUTDOWN_TIMEOUT_SECONDS", 30.0, minimum=0.1, maximum=3600)
        count = 1 if workers is None or link.is_worker else workers.count(config)
    except ConfigError as exc:
        _exit(2, f"{name}: bad configuration: {exc}")
    if count > 1:
        assert workers is not None
        _exit(*supervisor.run(name, load, config, workers, count, timeout))
    if link.is_worker:
        link.tie_to_supervisor()
    try:
        # Before anything starts (migrations, pools): a taken port is the commonest mistake.
        check_addresses(config.server)
    except AddressUnusable as exc:
        _exit(1, f"{name}: {exc}")
    _exit(*runtime.run(_Service(name, timeout, link).run(config, start)))


class _Service:
    """One run of an app: started and stopped around the signals the process gets."""

    def __init__(self, name: str, timeout: float, link: Link) -> None:
        self.name = name
        self.timeout = timeout
        self.link = link
        self.stop = asyncio.Event()

    async def run(self, config: Config, start: Callable[[Config], Awaitable[App]]
                  ) -> tuple[int, str]:
        """The exit status, and the line to print on stderr."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        starting = asyncio.ensure_future(start(config))
        waiting = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not starting.done():
            # Stopped while starting (waiting for Postgres, say): the app's start stops what
            # it had started when cancelled (relayq.app.ServiceApp).
            log.info("stopping before start finished", extra={"service": self.name})
            starting.cancel()
            await self._within_deadline(starting)
            return await self._leave(0)
        failure = starting.exception()
        if failure is not None:
            if isinstance(failure, AddressUnusable | JobsDBError):
                return await self._leave(1, f"{self.name}: {failure}")
            log.error("could not start", exc_info=failure, extra={"service": self.name})
            return await self._leave(1, f"{self.name}: could not start: {failure!r}")
        app = starting.result()
        self.link.ready()
        await self.stop.wait()
        log.info("shutting down", extra={"service": self.name})
        await self._within_deadline(asyncio.ensure_future(app.stop()))
        return await self._leave(0)

    async def _within_deadline(self, draining: asyncio.Future[Any]) -> None:
        """Wait for `draining` until the deadline; past it, exit."""
        # asyncio.wait, not wait_for: that would wait on for a cancellation to be honoured.
        await asyncio.wait({draining}, timeout=self.timeout)
        if not draining.done():
            log.error("draining took longer than RELAYQ_SHUTDOWN_TIMEOUT_SECONDS=%gs; exiting"
                      " without waiting for the rest (nothing acknowledged is lost: ingest"
                      " answers only after commit, unrecorded deliveries are made again)",
                      self.timeout, extra={"service": self.name})
            _abandon(1)
        if not draining.cancelled() and draining.exception() is not None:
            log.error("stopping failed", exc_info=draining.exception(),
                      extra={"service": self.name})

    async def _leave(self, status: int, message: str = "") -> tuple[int, str]:
        """End every task still running; abandon the process if some will not end."""
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if others:
            ending = asyncio.ensure_future(cancel_and_wait(others))
            await asyncio.wait({ending}, timeout=_LINGER_SECONDS)
            if not ending.done():
                names = sorted({t.get_name() for t in others if not t.done()})
                log.warning("background tasks did not stop; exiting without them",
                            extra={"service": self.name, "tasks": ",".join(names)})
                _abandon(status, message)
        return status, message

    def _signalled(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            self.stop.set()
            return
        if self.link.is_worker:
            # The copy a process group's signal or the supervisor's forwarding sends: a worker
            # is ended at once by its supervisor only (relayq.worker).
            log.info("%s again: draining goes on", sig.name, extra={"service": self.name})
            return
        log.warning("%s again: exiting at once", sig.name, extra={"service": self.name})
        _flush()
        # Die of the signal itself, so a parent or shell sees what ended the process.
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # pragma: no cover - the signal ends the process first


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def _abandon(status: int, message: str = "") -> NoReturn:
    """Exit now, skipping asyncio's teardown (which would wait for tasks that never end)."""
    _say(message)
    _flush()
    os._exit(status)


def _exit(status: int, message: str = "") -> NoReturn:
    _say(message)
    sys.exit(status)


def _say(message: str) -> None:
    """The process's last word on stderr; a worker's goes to its supervisor, which prints
    it once for all workers."""
    if not message:
        return
    if _link.is_worker:
        _link.failed(message)
    else:
        print(message, file=sys.stderr)


# This process's link to its supervisor (inert unless it is a worker).
_link = Link({})
