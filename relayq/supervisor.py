"""Several processes serving one service: RELAYQ_INGEST_WORKERS and RELAYQ_ROUTER_WORKERS.

A relayq process runs one event loop, so it uses one core at most. With N workers the console
script (relayq-ingest, relayq-router) becomes their supervisor, and each worker is the same
service started again with a few variables of its own (relayq.worker). The supervisor:

- does once, before any worker starts, what would otherwise fail N times alike: reads the
  configuration (exit 2 naming the variable), checks the gRPC and metrics addresses and holds
  the gRPC port for its workers (exit 1 naming the variable; relayq.addresses.reserve), waits
  for Postgres and migrates (exit 1 with Postgres's own message);
- starts the workers. They share the gRPC port (SO_REUSEPORT: the kernel spreads new
  connections over them) and, routers, the partition leases, each worker a router of its own
  under the id `<router id>/<worker number>`, stable across restarts;
- serves /metrics on the service's metrics address: the workers' counters and histograms
  added up (prometheus_client's multiprocess mode, in a directory made fresh for each start
  and removed at exit), a dead worker's counts included, so a scrape sees one service however
  many workers serve it and however often one was restarted;
- restarts a worker that dies: at once if it had run for a while, else after a backoff that
  doubles from half a second. A worker dying within seconds of its start five times in a row
  is no passing trouble: every worker is stopped and the service exits 1 saying so. While the
  service starts there is no second chance at all: a worker that cannot start fails it at
  once, with the worker's own one line;
- on SIGTERM or SIGINT forwards SIGTERM to every worker and waits for them all within
  RELAYQ_SHUTDOWN_TIMEOUT_SECONDS (each drains as a lone process does, and exits 1 past that
  same deadline, saying so); a worker still running a moment after it is killed. The exit
  status is 0 when every worker drained cleanly, else 1. A second signal kills the workers and
  ends the supervisor at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jobsdb import migrate
from jobsdb.errors import JobsDBError
from relayq import addresses, runtime, worker
from relayq.config import ConfigError, Env, ServerConfig

log = logging.getLogger(__name__)

# A worker that dies within this many seconds of its start died starting ...
QUICK_SECONDS = 10.0
# ... and this many such deaths in a row of one worker make the supervisor give up.
GIVE_UP_AFTER = 5
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 8.0
# Past the drain deadline, how long a worker gets to exit by itself (it exits 1 at the same
# deadline, saying so) before it is killed.
KILL_AFTER_SECONDS = 2.0
# How long the pipe of a worker that exited may take to give its last line.
_LAST_WORDS_SECONDS = 1.0
# Variables that would point a worker's metrics anywhere but this start's own directory.
_MULTIPROC = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


class Served(Protocol):
    @property
    def server(self) -> ServerConfig: ...


Config = TypeVar("Config", bound=Served)


def _nothing(config: Any, index: int) -> Mapping[str, str]:
    return {}


class Migrating(Protocol):
    @property
    def database_url(self) -> str: ...
    @property
    def migrate(self) -> bool: ...
    @property
    def startup_timeout_seconds(self) -> float: ...


def migrated(application_name: str) -> Callable[[Migrating], Awaitable[object]]:
    """A Plan's `prepare` for a service that waits for Postgres and migrates at start as
    every relayq service does (jobsdb.migrate.prepare)."""
    async def prepare(config: Migrating) -> object:
        return await migrate.prepare(config.database_url, apply=config.migrate,
                                     wait_seconds=config.startup_timeout_seconds,
                                     application_name=application_name)
    return prepare


@dataclass(frozen=True)
class Plan(Generic[Config]):
    """What a service tells its supervisor."""

    # Each worker runs `<module>.main()`.
    module: str
    # How many workers the configuration asks for.
    count: Callable[[Config], int]
    # Done once before any worker starts: wait for Postgres, migrate or check the schema.
    prepare: Callable[[Config], Awaitable[object]]
    # A worker's own variables, besides those every worker gets (a router's id).
    environment: Callable[[Config, int], Mapping[str, str]] = _nothing


def restart_delay(quick_deaths: int) -> float | None:
    """How long to wait before starting a worker again after `quick_deaths` deaths in a row
    within QUICK_SECONDS of its start (0: it had run a while); None: give up."""
    if quick_deaths >= GIVE_UP_AFTER:
        return None
    if quick_deaths == 0:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2.0 ** (quick_deaths - 1))


def run(name: str, load: Callable[[Env], Config], config: Config, plan: Plan[Config],
        count: int, timeout: float) -> tuple[int, str]:
    """Supervise `count` workers until a signal; the exit status and the line to print."""
    server = config.server
    try:
        reservation = addresses.reserve(server.address_variable, server.address)
    except addresses.AddressUnusable as exc:
        return 1, f"{name}: {exc}"
    directory: str | None = None
    stop_metrics: Callable[[], None] | None = None
    try:
        if server.metrics_address is not None:
            # Where the workers count, for the supervisor to add up; none without /metrics.
            _remove_orphans(name)
            directory = tempfile.mkdtemp(prefix=f"{name}-metrics-{os.getpid()}-")
        # Again with the port bound (the system's choice, for port 0): a router's default id
        # is made of it. Each worker's own settings are checked here too, once.
        base = {k: v for k, v in os.environ.items() if k not in _MULTIPROC}
        config = load(Env({**base, server.address_variable: reservation.address}))
        environs = [_environment(base, config, plan, index, reservation.address, directory)
                    for index in range(1, count + 1)]
        for environ in environs:
            load(Env(environ))
        if directory is not None:
            stop_metrics = _serve_metrics(server, directory)
        return runtime.run(_Supervisor(name, plan, config, environs, timeout, directory).run())
    except ConfigError as exc:
        return 2, f"{name}: bad configuration: {exc}"
    except addresses.AddressUnusable as exc:
        return 1, f"{name}: {exc}"
    except OSError as exc:  # mkdtemp: TMPDIR unwritable, say
        return 1, f"{name}: cannot make a directory for the workers' metrics: {exc}"
    finally:
        if stop_metrics is not None:
            stop_metrics()
        reservation.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def _remove_orphans(name: str) -> None:
    """Remove the metrics directories of this service's supervisors that are gone: one killed
    outright (SIGKILL, the OOM killer) had no chance to. The pid is in the name."""
    for path in Path(tempfile.gettempdir()).glob(f"{name}-metrics-*-*"):
        pid = path.name[len(name) + len("-metrics-"):].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


def _environment(base: Mapping[str, str], config: Config, plan: Plan[Config], index: int,
                 address: str, directory: str | None) -> dict[str, str]:
    server = config.server
    return {
        **base,
        server.address_variable: address,
        server.metrics_variable: "off",  # the supervisor serves everyone's
        **({"PROMETHEUS_MULTIPROC_DIR": directory} if directory is not None else {}),
        "RELAYQ_MIGRATE": "false",  # the supervisor did, or checked
        worker.INDEX: str(index),
        worker.SUPERVISOR: str(os.getpid()),
        **plan.environment(config, index),
    }


class _Counts:
    """What the supervisor itself reports, beside its workers' metrics (read by the metrics
    server's thread)."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.restarts = 0

    def collect(self) -> Iterator[Metric]:
        serving = sum(1 for w in self.workers if w.running and w.ready.is_set())
        yield GaugeMetricFamily("relayq_workers", "Worker processes started and serving (of"
                                " RELAYQ_<SERVICE>_WORKERS).", value=serving)
        yield CounterMetricFamily("relayq_worker_restarts", "Workers restarted after they"
                                  " died.", value=self.restarts)


_counts = _Counts()


def _serve_metrics(server: ServerConfig, directory: str) -> Callable[[], None]:
    assert server.metrics_address is not None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(_counts)
    host, port = addresses.split(server.metrics_address)
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise addresses.AddressUnusable(server.metrics_variable, server.metrics_address,
                                        addresses.reason(exc)) from None

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
    return stop


class _Worker:
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


class _Supervisor(Generic[Config]):
    def __init__(self, name: str, plan: Plan[Config], config: Config,
                 environs: list[dict[str, str]], timeout: float, directory: str | None
                 ) -> None:
        self.name = name
        self.plan = plan
        self.config = config
        self.timeout = timeout
        self.directory = directory
        self.workers = [_Worker(index, environ) for index, environ in
                        enumerate(environs, start=1)]
        _counts.workers = self.workers
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

    async def _keep(self, w: _Worker) -> None:
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
                    multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                        w.process.pid, self.directory)
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
            _counts.restarts += 1
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
            shutil.rmtree(self.directory, ignore_errors=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # pragma: no cover - the signal ends the process first
