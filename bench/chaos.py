"""A soak under faults: is anything acknowledged lost, and does every user's order hold?

    .venv/bin/python -m bench.chaos [--minutes 10] [--rate 400] [--seed 1]
    .venv/bin/python -m bench.chaos --smoke        # about a minute: one of each fault

On a Postgres of its own (a durable one: fsync and synchronous commit on, in a temporary
folder, so restarting it disturbs nothing else on the machine) it runs two relayq-ingest
processes, two relayq-router processes (one of them reaching Postgres through a TCP proxy
that this script can stall), relayq-admin, and a webhook receiver that fails a share of
deliveries (503, retried). Client tasks send events of their own users in order and re-send
every batch not acknowledged, with the same message ids, until it is. Meanwhile:

- every few seconds a random relayq process is killed with SIGKILL and started again;
- once, Postgres is crashed (`-m immediate`: SIGQUIT to the postmaster) and restarted;
- once, the proxied router's connection to Postgres stops moving bytes for three leases
  (the other router must take its partitions; it must stop its own deliveries first);
- once, the disk under relayq's tables is full for a while: the database's tablespace is on
  a tmpfs of its own, shrunk to what it holds (`--full-disk-seconds`, then grown back). Its
  WAL is elsewhere, as it should be in production (a full WAL disk stops Postgres itself).
  Needs root (mount); without it this fault is skipped, and the report says so.

At the end the clients stop, the queue drains, and the receiver's log is checked: every
acknowledged event delivered (missing must be 0), every user's first deliveries in the order
the client sent them (violations must be 0), duplicates (at-least-once: what was in flight
when something died), and how long each fault took to recover from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from aiohttp import web
from psycopg import sql

from bench.common import add_source, free_port, spawn, wait_ready
from jobsdb import migrate
from jobsdb.keyspace import partition_of
from relayq.cli import embedded
from relayq.cli.embedded import EmbeddedPostgres
from relayq.v1 import ingest_pb2, ingest_pb2_grpc
from tests.tcpproxy import TCPProxy

LEASE = 5
ADMIN_TOKEN = "chaos-operator-token-0123456789"


class SmallDisk:
    """A tmpfs for the tablespace of relayq's tables, that can be made full (shrunk to what
    it holds, so no RAM goes to ballast) and given room again."""

    def __init__(self, path: Path, owner: pwd.struct_passwd | None, size_mb: int = 4096) -> None:
        self.path = path
        self.size = f"{size_mb}m"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                        str(path)], check=True)
        self.tablespace = path / "tablespace"
        self.tablespace.mkdir()
        if owner is not None:
            os.chown(self.tablespace, owner.pw_uid, owner.pw_gid)

    def fill(self) -> None:
        """Shrink it to what it holds (a little more if it grew meanwhile)."""
        for _ in range(20):
            stat = os.statvfs(self.path)
            used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
            done = subprocess.run(["mount", "-o", f"remount,size={used + 65536}",
                                   str(self.path)], capture_output=True)
            if done.returncode == 0:
                return
        raise RuntimeError(f"could not shrink {self.path}: {done.stderr!r}")

    def free(self) -> None:
        subprocess.run(["mount", "-o", f"remount,size={self.size}", str(self.path)],
                       check=True)

    def remove(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@dataclass
class Receiver:
    """The destination: answers 503 to a share of deliveries, records the rest in order."""

    fail_share: float
    rng: random.Random
    oks: list[tuple[float, str, int]] = field(default_factory=list)  # (time, user, seq)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        # A delivery whose sender hangs up before the answer is not processed.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.rng.random() < self.fail_share:
            return web.Response(status=503, text="try later")
        await asyncio.sleep(0.002)
        self.oks.append((time.monotonic(), body["userId"], body["properties"]["seq"]))
        return web.Response(status=200)


@dataclass
class Service:
    name: str
    module: str
    env: dict[str, str]
    port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = spawn(self.module, self.env)
        wait_ready(self.port, timeout=60)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not drained within 40 s (its own deadline is 30)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop within 40 s of SIGTERM; killed", flush=True)
                self.process.kill()
                self.process.wait()


@dataclass
class Clients:
    """Users each owned by one client task, which sends one batch at a time and re-sends it
    (same message ids) until some ingest acknowledges it: per user, acknowledged order is
    send order."""

    stubs: list[ingest_pb2_grpc.IngestStub]
    write_key: str
    rate: float
    users: int
    tasks_n: int
    rng: random.Random
    acked: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    ack_times: list[float] = field(default_factory=list)
    resends: int = 0
    # Why batches were refused: status code -> count.
    refusals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    running: bool = True

    async def run(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(self.tasks_n)))

    async def _client(self, n: int) -> None:
        users = [f"user-{u}" for u in range(n, self.users, self.tasks_n)]
        seq: dict[str, int] = defaultdict(int)
        batch_size = 20
        pause = batch_size * self.tasks_n / self.rate
        metadata = (("authorization", f"Bearer {self.write_key}"),)
        while self.running:
            chosen = [self.rng.choice(users) for _ in range(batch_size)]
            events = []
            for user in chosen:
                seq[user] += 1
                events.append(ingest_pb2.Event(
                    message_id=f"{user}-{seq[user]}", user_id=user, type="track",
                    event="Chaos", payload_json=json.dumps({"seq": seq[user]})))
            request = ingest_pb2.IngestRequest(events=events)
            wait = 0.1
            while True:
                stub = self.rng.choice(self.stubs)
                try:
                    await stub.Ingest(request, metadata=metadata, timeout=5)
                    break
                except grpc.aio.AioRpcError as exc:
                    self.resends += 1
                    self.refusals[exc.code().name] += 1
                    await asyncio.sleep(wait)
                    wait = min(2.0, wait * 2)
            now = time.monotonic()
            for event in events:
                self.acked[event.user_id].append(json.loads(event.payload_json)["seq"])
                self.ack_times.append(now)
            await asyncio.sleep(pause * (0.5 + self.rng.random()))


def gap_after(times: list[float], start: float, within: float = 60.0) -> float:
    """The longest stretch with nothing in `times` from `start` on (for `within` seconds):
    how long whatever `times` records stopped after a fault."""
    stamps = sorted(t for t in times if start <= t <= start + within)
    points = [start, *stamps]
    if not stamps:
        return within
    return max(b - a for a, b in itertools.pairwise(points))


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="relayq-chaos-"))
    postgres = EmbeddedPostgres(workdir / "pgdata", workdir / "postgres.log", durable=True,
                                tied_to_parent=False)
    postgres.start(free_port(0))
    receiver = Receiver(args.fail_share, random.Random(args.seed + 1))
    await receiver.start()
    proxy = TCPProxy("127.0.0.1", postgres.port)
    await proxy.start()
    disk: SmallDisk | None = None
    dsn = postgres.dsn
    if os.geteuid() == 0:
        # relayq's tables in a database whose tablespace is on a disk the soak can fill.
        disk = SmallDisk(workdir / "disk", embedded._service_user())
        _mounts.append(disk)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE TABLESPACE small LOCATION {}").format(
                sql.Literal(str(disk.tablespace))))
            conn.execute("CREATE DATABASE chaos TABLESPACE small")
        dsn = dsn.rpartition("/")[0] + "/chaos"
    proxied = dsn.replace(f":{postgres.port}/", f":{proxy.port}/")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
        await migrate.migrate(c)
    with psycopg.connect(dsn, autocommit=True) as conn:
        write_key, _, _, _ = add_source(
            conn, "chaos", "clients", {"receiver": ("webhook",
                                                    f"http://127.0.0.1:{receiver.port}/hook")},
            min_backoff_ms=100, max_backoff_ms=2000, max_attempts=1000,
            max_retry_window_s=86400, circuit_after_s=0)

    def service(name: str, module: str, prefix: str, database: str) -> Service:
        port = free_port()
        return Service(name, module, {
            "RELAYQ_DATABASE_URL": database,
            f"RELAYQ_{prefix}_ADDRESS": f"127.0.0.1:{port}",
            f"RELAYQ_{prefix}_METRICS_ADDRESS": "off",
            "RELAYQ_ROUTER_LEASE_SECONDS": str(LEASE),
            "RELAYQ_ADMIN_TOKEN": ADMIN_TOKEN,
            "RELAYQ_LOG_LEVEL": "error",
        }, port)

    services = [
        service("ingest-1", "ingest_service.main", "INGEST", dsn),
        service("ingest-2", "ingest_service.main", "INGEST", dsn),
        service("router-1", "router_service.main", "ROUTER", proxied),
        service("router-2", "router_service.main", "ROUTER", dsn),
        service("admin", "admin_service.main", "ADMIN", dsn),
    ]
    for s in services:
        await asyncio.to_thread(s.start)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") for s in services[:2]]
    clients = Clients([ingest_pb2_grpc.IngestStub(c) for c in channels], write_key,
                      args.rate, users=args.users, tasks_n=8, rng=random.Random(args.seed + 2))
    traffic = asyncio.create_task(clients.run())

    duration = args.minutes * 60
    started = time.monotonic()
    # (what, when, back up after, the users whose deliveries it could hold up: None for all)
    faults: list[tuple[str, float, float, set[str] | None]] = []
    all_users = [f"user-{u}" for u in range(args.users)]

    def users_of(router: Service) -> set[str]:
        """The users whose partitions `router` owns now (its share of the key space)."""
        router_id = f"{socket.gethostname()}:{router.port}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            owned = {int(p) for (p,) in conn.execute(
                "SELECT partition FROM router_leases WHERE owner = %s", (router_id,))}
        return {u for u in all_users if partition_of(u, 64) in owned}

    pg_at, stall_at = started + duration * 0.3, started + duration * 0.7
    full_at = started + duration * 0.5
    pg_done = stall_done = False
    full_done = disk is None
    next_kill = started + args.kill_every
    # Every process in turn, in an order the seed shuffles, a router first (so even the
    # shortest run kills one).
    first = rng.choice(services[2:4])
    rest = [s for s in services if s is not first]
    rng.shuffle(rest)
    victims = itertools.cycle([first, *rest])
    try:
        while time.monotonic() - started < duration:
            now = time.monotonic()
            if not pg_done and now >= pg_at:
                pg_done = True
                print(f"[{now - started:6.1f}s] crashing Postgres (immediate) and restarting it",
                      flush=True)
                port = postgres.port
                postgres.crash()
                await asyncio.sleep(2.0)
                postgres.start(port)  # blocks this loop for a moment: Postgres is down anyway
                assert postgres.port == port, "Postgres came back on another port"
                faults.append(("postgres restart", now, time.monotonic() - now, None))
                next_kill = time.monotonic() + args.kill_every
            elif not full_done and now >= full_at:
                full_done = True
                assert disk is not None
                print(f"[{now - started:6.1f}s] the disk of relayq's tables is full for"
                      f" {args.full_disk_seconds:g}s", flush=True)
                disk.fill()
                await asyncio.sleep(args.full_disk_seconds)
                disk.free()
                faults.append(("disk full", now, args.full_disk_seconds, None))
                next_kill = time.monotonic() + args.kill_every
            elif not stall_done and now >= stall_at:
                stall_done = True
                print(f"[{now - started:6.1f}s] stalling router-1's connection to Postgres for"
                      f" {3 * LEASE}s", flush=True)
                held_up = await asyncio.to_thread(users_of, services[2])
                proxy.stall()
                await asyncio.sleep(3 * LEASE)
                proxy.resume()
                faults.append(("router-1 stalled", now, 3 * LEASE, held_up))
                next_kill = time.monotonic() + args.kill_every
            elif now >= next_kill:
                victim = next(victims)
                print(f"[{now - started:6.1f}s] kill -9 {victim.name}", flush=True)
                held_up = (await asyncio.to_thread(users_of, victim)
                           if victim.module == "router_service.main" else None)
                victim.kill()
                await asyncio.to_thread(victim.start)
                faults.append((f"kill -9 {victim.name}", now, time.monotonic() - now,
                               held_up))
                next_kill = time.monotonic() + args.kill_every * (0.5 + rng.random())
            await asyncio.sleep(0.2)
    finally:
        clients.running = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(traffic, 30)

    acked_total = sum(len(v) for v in clients.acked.values())
    print(f"traffic stopped: {acked_total:,} events acknowledged; draining", flush=True)
    deadline = time.monotonic() + args.drain_seconds
    delivered: set[tuple[str, int]] = set()
    wanted = {(u, s) for u, seqs in clients.acked.items() for s in seqs}
    while time.monotonic() < deadline:
        delivered = {(u, s) for _, u, s in receiver.oks}
        if wanted <= delivered:
            break
        await asyncio.sleep(0.5)

    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in services))
    for channel in channels:
        await channel.close()
    await receiver.stop()
    proxy.resume()
    await proxy.cut()
    postgres.stop()
    if disk is not None:
        disk.remove()
        _mounts.remove(disk)

    missing = len(wanted - delivered)
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    for _, user, seq in receiver.oks:
        if (user, seq) not in seen:
            seen.add((user, seq))
            firsts[user].append(seq)
    violations = 0
    for user, seqs in clients.acked.items():
        got = [s for s in firsts.get(user, []) if s in set(seqs)]
        violations += sum(1 for a, b in itertools.pairwise(got) if b < a)
    duplicates = len(receiver.oks) - len(seen)

    print()
    print(f"chaos soak: {args.minutes:g} min, {args.rate:g} events/s offered,"
          f" {args.users} users, receiver failing {args.fail_share:.0%} of deliveries,"
          f" lease {LEASE}s, seed {args.seed}")
    print(f"  acknowledged events       {acked_total:>10,}")
    print(f"  missing at the receiver   {missing:>10,}   (must be 0)")
    print(f"  per-user order violations {violations:>10,}   (must be 0)")
    print(f"  duplicates delivered      {duplicates:>10,}   (at least once: in flight at a fault)")
    print(f"  batches re-sent by clients{clients.resends:>10,}   "
          + ", ".join(f"{code} {n:,}" for code, n in sorted(clients.refusals.items())))
    if disk is None:
        print("  (no disk-full fault: it needs root, to mount a tmpfs)")
    print("  faults: what, at, back up after, longest pause after it in deliveries (of the")
    print("  users whose partitions a router held, for a router) and in acknowledgements")
    for what, when, ready, held_up in faults:
        times = [t for t, user, _ in receiver.oks if held_up is None or user in held_up]
        paused = (f"{gap_after(times, when):5.1f}s" if held_up is None or held_up
                  else "  n/a (it owned no partition)")
        print(f"    {what:<22} {when - started:7.1f}s  up {ready:5.1f}s"
              f"  deliveries paused {paused}"
              f"  acks paused {gap_after(clients.ack_times, when):5.1f}s")
    if missing or violations:
        print(f"  FAILED; Postgres log in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def soak_and_clean_up(args: argparse.Namespace) -> int:
    try:
        return await soak(args)
    finally:
        # Whatever happened (an error, Ctrl-C), no service or Postgres outlives the soak.
        for process in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)
        for disk in _mounts:  # nor a tmpfs mount
            disk.remove()


# Mounted by the soak, to unmount whatever happens.
_mounts: list[SmallDisk] = []


def _children() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(entry.name))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=400.0, help="events/s offered")
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between kills")
    parser.add_argument("--fail-share", type=float, default=0.05)
    parser.add_argument("--drain-seconds", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--full-disk-seconds", type=float, default=15.0,
                        help="how long the disk of relayq's tables is full")
    parser.add_argument("--smoke", action="store_true", help="about 40 s, one of each fault")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.rate, args.kill_every, args.drain_seconds = 0.5, 200.0, 8.0, 60.0
        args.full_disk_seconds = 5.0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(asyncio.run(soak_and_clean_up(args)))


if __name__ == "__main__":
    main()
