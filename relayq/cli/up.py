"""relayq up: a whole local cluster, with demo traffic, in one command, until Ctrl-C.

The order matters both ways. Up: the database (RELAYQ_DATABASE_URL, or an embedded Postgres
in a folder the user can see and delete), its migrations, the demo sink, then ingest, router
and admin as separate processes, each waited for until its health check says SERVING; then
the demo is configured through the admin API, as an operator would, and traffic starts.
Down (Ctrl-C, SIGTERM, --duration, or a child that died): traffic first, then the services
drain (in-flight deliveries are recorded), and the database goes last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

from jobsdb import errors as dberrors
from jobsdb import migrate, sealing
from relayq import runtime, terminal
from relayq.cli.children import Child, ChildFailed, python
from relayq.cli.embedded import EmbeddedPostgres, EmbeddedPostgresError
from relayq.demo import configure, progress, traffic
from relayq.ports import free_port
from relayq.v1 import admin_pb2_grpc

DEFAULT_PORTS = {"ingest": 50051, "admin": 50052, "router": 50053, "ingest_metrics": 9151,
                 "admin_metrics": 9152, "router_metrics": 9153, "sink": 8090, "postgres": 5433,
                 "console": 8080}
# Each service, in the order they start (and the reverse of how they stop).
SERVICES = (("ingest", "ingest_service.main"), ("router", "router_service.main"),
            ("admin", "admin_service.main"))


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser(
        "up", help="run a local cluster (ingest, router, admin) with demo traffic until Ctrl-C",
        description=__doc__.split("\n\n")[0] + " Uses RELAYQ_DATABASE_URL when set, else an"
        " embedded Postgres (the pgserver package).")
    cmd.add_argument("--data-dir", type=Path, default=Path(".relayq/pgdata"),
                     help="the embedded Postgres's folder; logs and cluster.json go beside it"
                          " (default .relayq/pgdata)")
    cmd.add_argument("--events-per-second", type=float, default=20.0,
                     help="demo events sent per second (default 20)")
    cmd.add_argument("--no-demo-traffic", action="store_true",
                     help="configure the demo but send no events (send your own)")
    cmd.add_argument("--flaky-error-rate", type=float, default=0.2,
                     help="share of deliveries the flaky demo endpoint answers 500 (default 0.2)")
    cmd.add_argument("--flaky-reject-rate", type=float, default=0.005,
                     help="share it answers 422, which aborts the job (default 0.005)")
    cmd.add_argument("--free-ports", action="store_true",
                     help="let the system pick every port instead of trying the defaults first")
    cmd.add_argument("--duration", type=float, default=0.0,
                     help="stop by itself after this many seconds (default: run until Ctrl-C)")
    cmd.add_argument("--grace", type=float, default=15.0,
                     help="seconds each process gets to drain when stopping (default 15)")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return runtime.run(Cluster(args).run())


class AlreadyRunning(Exception):
    """Another `relayq up` runs with the same data folder."""


@dataclass
class Ports:
    values: dict[str, int] = field(default_factory=dict)

    @classmethod
    def choose(cls, any_port: bool) -> Ports:
        chosen: dict[str, int] = {}
        for name, default in DEFAULT_PORTS.items():
            port = free_port(0 if any_port else default)
            while port in chosen.values():
                port = free_port(0)
            chosen[name] = port
        return cls(chosen)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.values[name]}"


def _say(text: str, out: TextIO | None = None) -> None:
    # Output is only for whoever watches: once its reader is gone (`make up | tee log`, then
    # tee dies) the cluster runs on, silently, and still stops on a signal.
    terminal.write(text + "\n", out)


class Cluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir: Path = args.data_dir.resolve()
        self.state_dir = self.data_dir.parent
        self.log_dir = self.state_dir / "logs"
        self.info_path = self.state_dir / "cluster.json"
        self.postgres: EmbeddedPostgres | None = None
        self.children: dict[str, Child] = {}
        self.ports = Ports.choose(args.free_ports)
        self.token = "rq_op_" + secrets.token_urlsafe(24)
        self.stop = asyncio.Event()
        self.failure: str | None = None
        self.demo: configure.Demo | None = None
        self.traffic: traffic.Traffic | None = None
        self.view: progress.Progress | None = None
        self.wrote_info = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signalled, sig)
        try:
            if await self._until_stopped(self._start()):
                await self._serve()
        except (AlreadyRunning, ChildFailed, EmbeddedPostgresError, grpc.aio.AioRpcError, OSError,
                dberrors.JobsDBError) as exc:
            self.failure = str(exc) if not isinstance(exc, grpc.aio.AioRpcError) else (
                f"the admin API answered {exc.code().name}: {exc.details()}")
        finally:
            await self._shutdown()
        if self.failure:
            _say(f"relayq up: {self.failure}", sys.stderr)
            return 1
        return 0

    def _signalled(self, sig: signal.Signals) -> None:
        """Act first, then tell: telling may fail (a closed pipe), acting must not."""
        if self.stop.is_set():
            # A second Ctrl-C: no more waiting for drains.
            self.failure = self.failure or "stopped by force: the processes were killed"
            for child in self.children.values():
                if child.running():
                    child.process.kill()
            if self.postgres is not None and self.postgres.process is not None:
                self.postgres.process.send_signal(signal.SIGQUIT)  # immediate shutdown
            _say(f"\nrelayq up: {sig.name} again: killed every process")
            return
        self.stop.set()
        if self.view is not None:
            self.view.interrupted()
        _say(f"\nrelayq up: {sig.name}: stopping (traffic, services, then the database)"
             "; Ctrl-C again to kill them at once...")

    async def _until_stopped(self, work: Awaitable[None]) -> bool:
        """Run `work` unless a signal comes first; True if it finished."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True

    # ---- up ----

    def _database(self) -> str:
        dsn = os.environ.get("RELAYQ_DATABASE_URL", "").strip()
        if dsn:
            _say("relayq up: using the database at RELAYQ_DATABASE_URL")
            return dsn
        _say(f"relayq up: starting an embedded Postgres in {self._shown(self.data_dir)}")
        self.postgres = EmbeddedPostgres(self.data_dir, self.log_dir / "postgres.log")
        # In this (the main) thread: the parent-death signal fires when the thread that
        # started the child ends, so never from a worker thread.
        self.postgres.start(preferred_port=0 if self.args.free_ports
                            else self.ports.values["postgres"])
        return self.postgres.dsn

    def _env(self, dsn: str) -> dict[str, str]:
        # Nothing of the caller's RELAYQ_* but the log level: the cluster is this one, on
        # loopback and in plaintext (up itself talks to it without TLS).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("RELAYQ_") or k == "RELAYQ_LOG_LEVEL"}
        env.update({
            "RELAYQ_DATABASE_URL": dsn,
            "RELAYQ_MIGRATE": "false",  # done once, here, before anything starts
            "RELAYQ_LOG_FORMAT": "json",
            "RELAYQ_ADMIN_TOKEN": self.token,
            "RELAYQ_ROUTER_POLL_SECONDS": "0.5",
            # The demo sink is on loopback, which destinations may not reach by default
            # (relayq.netpolicy): this local cluster allows loopback, plus what the caller
            # allows.
            "RELAYQ_DESTINATION_ALLOW_NETWORKS": ",".join(filter(None, (
                "127.0.0.0/8,::1/128",
                os.environ.get("RELAYQ_DESTINATION_ALLOW_NETWORKS", "").strip()))),
            "RELAYQ_SECRET_KEYS": self._secret_keys(),
            "RELAYQ_SHUTDOWN_GRACE_SECONDS": str(max(1.0, self.args.grace - 2)),
            # Past this a child gives up draining and says so, rather than being killed unheard.
            "RELAYQ_SHUTDOWN_TIMEOUT_SECONDS": str(max(1.5, self.args.grace - 1)),
            "PYTHONUNBUFFERED": "1",
        })
        for name, _ in SERVICES:
            env[f"RELAYQ_{name.upper()}_ADDRESS"] = self.ports.address(name)
            env[f"RELAYQ_{name.upper()}_METRICS_ADDRESS"] = self.ports.address(f"{name}_metrics")
        env["RELAYQ_ADMIN_CONSOLE_ADDRESS"] = self.ports.address("console")
        return env

    def _secret_keys(self) -> str:
        """RELAYQ_SECRET_KEYS for the cluster: the caller's, or a key generated on first use
        and kept beside the database (`secret-keys`, mode 0600), since the database's secrets
        are sealed under it (jobsdb.sealing): delete both together to start afresh."""
        given = os.environ.get("RELAYQ_SECRET_KEYS", "").strip()
        if given:
            return given
        path: Path = self.state_dir / "secret-keys"
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(sealing.new_key() + "\n")
        return path.read_text().strip()

    def _check_not_running(self) -> None:
        """A second `relayq up` on the same folder would fight the first over its database."""
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return
        alive = []
        for pid in info.get("pids", {}).values():
            try:
                os.kill(int(pid), 0)
            except (OSError, ValueError):
                continue
            alive.append(int(pid))
        if alive:
            raise AlreadyRunning(
                f"another relayq up is running with {self._shown(self.state_dir)}"
                f" (its processes {', '.join(map(str, alive))}); stop it, or give this one"
                " another --data-dir")

    async def _start(self) -> None:
        self._check_not_running()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        dsn = self._database()
        settings = await migrate.prepare(dsn, apply=True, wait_seconds=30,
                                         application_name="relayq-up")
        _say(f"relayq up: schema is current ({settings.ordering_partitions} ordering partitions)")
        env = self._env(dsn)
        self.children["sink"] = Child(
            "demo sink",
            [sys.executable, "-m", "relayq.demo.sink", "--port", str(self.ports.values["sink"]),
             "--error-rate", str(self.args.flaky_error_rate),
             "--reject-rate", str(self.args.flaky_reject_rate)],
            env, self.log_dir / "sink.log")
        for name, module in SERVICES:
            self.children[name] = Child(f"relayq-{name}", python(module), env,
                                        self.log_dir / f"{name}.log")
        await asyncio.gather(
            self.children["sink"].wait_http(f"{self._sink_url}/stats"),
            *(self.children[name].wait_serving(self.ports.address(name))
              for name, _ in SERVICES))
        _say("relayq up: ingest, router, admin and the demo sink are serving")
        async with grpc.aio.insecure_channel(self.ports.address("admin")) as channel:
            self.demo = await configure.configure(
                admin_pb2_grpc.AdminStub(channel), self.token, self._sink_url)
        self._write_info(dsn)
        _say(self._try_it())

    @property
    def _sink_url(self) -> str:
        return f"http://{self.ports.address('sink')}"

    @property
    def _console_url(self) -> str:
        return f"http://{self.ports.address('console')}/"

    # ---- running ----

    async def _serve(self) -> None:
        assert self.demo is not None
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._watch())]
        if self.args.duration > 0:
            tasks.append(asyncio.create_task(self._stop_after(self.args.duration)))
        async with grpc.aio.insecure_channel(self.ports.address("admin")) as admin:
            traffic_stop = asyncio.Event()
            self.traffic = traffic.Traffic(self.ports.address("ingest"), self.demo.write_key,
                                           self.args.events_per_second)
            if not self.args.no_demo_traffic and self.args.events_per_second > 0:
                tasks.append(asyncio.create_task(self.traffic.run(traffic_stop)))
            view = self.view = progress.Progress(admin_pb2_grpc.AdminStub(admin), self.token,
                                     lambda: self.traffic.counts if self.traffic else {},
                                     f"{self._sink_url}/stats")
            view_stop = asyncio.Event()
            tasks.append(asyncio.create_task(view.run(view_stop)))
            await self.stop.wait()
            traffic_stop.set()
            view_stop.set()
            done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self.failure = self.failure or repr(task.exception())

    async def _watch(self) -> None:
        """A child that exits on its own stops the cluster, with its last log lines."""
        while not self.stop.is_set():
            for child in self.children.values():
                if not child.running():
                    self.failure = str(child.failure())
                    self.stop.set()
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)

    async def _stop_after(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        self.stop.set()

    # ---- down ----

    async def _shutdown(self) -> None:
        services = [self.children[name] for name, _ in SERVICES if name in self.children]
        codes = await asyncio.gather(*(child.stop(self.args.grace) for child in services))
        if "sink" in self.children:
            await self.children["sink"].stop(5)
        for child, code in zip(services, codes, strict=True):
            if code not in (0, -signal.SIGTERM) and self.failure is None:
                self.failure = f"{child.name} exited with status {code}; see {child.log_path}"
        if self.postgres is not None:
            self.postgres.stop()
        if self.wrote_info:
            with contextlib.suppress(FileNotFoundError):
                self.info_path.unlink()
        if self.failure is None:
            kept = (f"; the embedded database is kept in {self._shown(self.data_dir)}"
                    f" (delete the folder to start afresh)" if self.postgres else "")
            _say(f"relayq up: stopped cleanly{kept}")

    # ---- what the user sees ----

    def _write_info(self, dsn: str) -> None:
        """cluster.json: addresses, credentials and pids, for scripts and tests."""
        assert self.demo is not None
        info = {
            "database_url": dsn,
            "addresses": {name: self.ports.address(name) for name, _ in SERVICES},
            "metrics": {name: f"http://{self.ports.address(name + '_metrics')}/metrics"
                        for name, _ in SERVICES},
            "sink": self._sink_url,
            "console": self._console_url,
            "admin_token": self.token,
            "tenant_id": self.demo.tenant_id,
            "source_id": self.demo.source_id,
            "write_key": self.demo.write_key,
            "destination_ids": list(self.demo.destination_ids),
            "pids": {name: child.pid for name, child in self.children.items()}
            | ({"postgres": self.postgres.process.pid}
               if self.postgres is not None and self.postgres.process is not None else {}),
        }
        self.info_path.write_text(json.dumps(info, indent=2) + "\n")
        self.wrote_info = True
        self.info_path.chmod(0o600)

    def _shown(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return "./" + str(path.relative_to(Path.cwd()))
        return str(path)

    def _relayq_command(self) -> str:
        script = Path(sys.executable).parent / "relayq"
        found = shutil.which("relayq")
        if found and Path(found).resolve() == script.resolve():
            return "relayq"
        return self._shown(script)

    def _try_it(self) -> str:
        assert self.demo is not None
        admin, ingest = self.ports.address("admin"), self.ports.address("ingest")
        relayq = self._relayq_command()
        token, key = self.token, self.demo.write_key
        event = json.dumps({"events": [{
            "message_id": f"try-{secrets.token_hex(3)}", "user_id": "you", "type": "track",
            "event": "Tried relayq", "properties": {"seq": 1, "hello": "world"}}]})
        # Double quotes: the filter language's strings are single-quoted.
        stuck = "\"destination = 'demo-flaky' AND state IN ('failed','waiting')\""
        env = (f"export RELAYQ_ADMIN_ADDRESS={admin}"
               f" RELAYQ_ADMIN_TOKEN={shlex.quote(token)}")
        lines = [
            "",
            "relayq is up. The demo: source 'demo-web' sends about"
            f" {self.args.events_per_second:g} events/s from 20 shoppers to two webhooks:"
            " 'demo-healthy', and 'demo-flaky', which answers"
            f" {self.args.flaky_error_rate:.0%} of deliveries with 500 (retried, holding"
            " that shopper's later events behind: the ordering barrier) and"
            f" {self.args.flaky_reject_rate:.1%} with 422 (aborted).",
            "",
            f"  console {self._console_url}  (sign in with the operator token {token})",
            f"  ingest  {ingest}    admin  {admin}    router  {self.ports.address('router')}",
            "  metrics " + "  ".join(
                f"{n} http://{self.ports.address(n + '_metrics')}/metrics" for n, _ in SERVICES),
            f"  logs    {self._shown(self.log_dir)}/    details  {self._shown(self.info_path)}",
            "",
            "Try, in another terminal:",
            f"  {env}",
            f"  {relayq} stats",
            f"  {relayq} jobs list --filter {stuck}",
            f"  {relayq} jobs peek demo-flaky",
            f"  grpcurl -plaintext {admin} list",
            f"  grpcurl -plaintext -H 'authorization: Bearer {token}' -d '{{}}'"
            f" {admin} relayq.v1.Admin/GetStats",
            f"  grpcurl -plaintext -H 'authorization: Bearer {key}' -d '{event}'"
            f" {ingest} relayq.v1.Ingest/Ingest",
            f"  grpcurl -plaintext -H 'authorization: Bearer {token}'"
            f" {self.ports.address('router')} relayq.v1.RouterStatus/GetStatus",
            f"  curl -s http://{self.ports.address('router_metrics')}/metrics | grep ^relayq_",
            "",
        ]
        return "\n".join(lines)
