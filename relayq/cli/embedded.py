"""An embedded PostgreSQL for `relayq up`: the server binaries of the `pgserver` package,
run as our own child process.

pgserver's own manager starts the server with `pg_ctl start` (a daemon detached from us),
shares it between processes through lock and pid files, and stops it from an atexit hook.
`relayq up` wants the opposite: one server it alone owns, stopped when it stops, and gone
even when `relayq up` is killed. So we use only pgserver's binaries and run `postgres` in
the foreground: initdb once into a folder the user can see (and delete), then postgres on a
loopback port with the parent-death signal set, so a kill -9 of `relayq up` still takes it
down.

Postgres refuses to run as root. As root we run initdb and postgres as an unprivileged
system user (created once with useradd), own the data folder by that user, and make sure it
can traverse the folders above the data and the binaries (search permission only).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from relayq.ports import free_port
from relayq.worker import die_with_parent

SERVICE_USER = "relayq"
DATABASE = "relayq"


class EmbeddedPostgresError(Exception):
    """The embedded Postgres could not be prepared or started. The message says why."""


def binaries() -> Path:
    """Where pgserver keeps initdb and postgres."""
    # find_spec, not import: importing pgserver sets up its own server manager (and warns
    # when XDG_RUNTIME_DIR is unset); we only want its files.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise EmbeddedPostgresError(
            "RELAYQ_DATABASE_URL is not set and the pgserver package (an embedded Postgres)"
            " is not installed: pip install pgserver")
    path = Path(spec.origin).resolve().parent / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresError(f"no postgres binary under {path}")
    return path


def _service_user() -> pwd.struct_passwd | None:
    """The user to run Postgres as: None when we are not root (then we run it as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    try:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SERVICE_USER], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise EmbeddedPostgresError(
            f"running as root, and Postgres refuses root; could not create the system user "
            f"{SERVICE_USER!r} to run it as: {detail}") from exc
    return pwd.getpwnam(SERVICE_USER)


def _allow_traversal(path: Path) -> None:
    """Let every user search (not list) each folder above `path`, as Postgres's user must."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            folder.chmod(wanted)


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in (*dirs, *files))):
            os.lchown(name, user.pw_uid, user.pw_gid)


def _run_as(user: pwd.struct_passwd | None,
            forks: bool) -> tuple[dict[str, object], list[str]]:
    """How to start a child as `user`: Popen arguments, or a command prefix.

    setpriv changes user after exec, so Popen can start it with vfork. Popen's own `user=`
    makes it fork, and a fork runs gRPC's fork handlers, which crash the child (SIGSEGV
    before exec) while other threads are calling into gRPC: bench/chaos.py restarts
    Postgres with gRPC busy in the same process. When Popen forks anyway (`forks`: a
    preexec_fn sets the parent-death signal) its `user=` is kept, because it changes user
    before the preexec_fn runs, and a change of user after it (setpriv) clears the signal."""
    if user is None:
        return {}, []
    setpriv = shutil.which("setpriv")
    if forks or setpriv is None:
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}, []
    return {}, [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                "--clear-groups"]


@dataclass
class EmbeddedPostgres:
    """A Postgres cluster in `data_dir`, served on 127.0.0.1:`port` while started."""

    data_dir: Path
    log_file: Path
    port: int = 0
    # False (the default, for `relayq up` and tests): fsync and synchronous commit off, fast
    # and safe against a crash of relayq, not of Postgres. True keeps every commit on disk
    # before it is acknowledged, as a production server would (bench/chaos.py crashes it).
    durable: bool = False
    # Stop with us even if we are killed (a parent-death signal, set in the forked child).
    # That runs Python between fork and exec, which a process with other threads (gRPC's)
    # must not do: bench/chaos.py restarts Postgres while gRPC runs, and cleans up itself.
    tied_to_parent: bool = True
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def server_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def start(self, preferred_port: int = 5433, timeout: float = 60.0) -> None:
        """initdb if the folder is new, start postgres, wait until it answers, create the
        relayq database if missing."""
        bindir = binaries()
        user = _service_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _allow_traversal(self.data_dir)
            _allow_traversal(bindir)
            if self.data_dir.stat().st_uid != user.pw_uid:
                _chown_tree(self.data_dir, user)
        self.data_dir.chmod(0o700)
        as_user, drop = _run_as(user, forks=self.tied_to_parent)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        self._log = self.log_file.open("ab")
        if not (self.data_dir / "PG_VERSION").exists():
            result = subprocess.run(
                [*drop, str(bindir / "initdb"), "-D", str(self.data_dir), "--username=postgres",
                 "--auth=trust", "--encoding=UTF8", "--no-instructions"],
                stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
                check=False, **as_user)  # type: ignore[call-overload]
            if result.returncode != 0:
                raise EmbeddedPostgresError(
                    f"initdb failed (exit {result.returncode}); see {self.log_file}")
        self.port = free_port(preferred_port)
        fast = [] if self.durable else [
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.process = subprocess.Popen(
            [*drop, str(bindir / "postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1",
             "-p", str(self.port), "-k", "", "-c", "max_connections=200", *fast],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.data_dir, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGQUIT) if self.tied_to_parent else None,
            **as_user)  # type: ignore[call-overload]
        self._wait_ready(timeout)
        self._create_database()

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited at start (exit {self.process.returncode});"
                    f" see {self.log_file}{self._log_tail()}")
            try:
                with psycopg.connect(self.server_dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedPostgresError(
                        f"postgres did not answer within {timeout:.0f}s;"
                        f" see {self.log_file}{self._log_tail()}") from None
                time.sleep(0.1)

    def _log_tail(self, lines: int = 5) -> str:
        """The last lines of the server's log, to go with an error: a crash at start is
        explained there, and the folder may be gone by the time anyone looks."""
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n  | {line}" for line in tail)

    def _create_database(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (DATABASE,)).fetchone()
            if found is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT, `pg_ctl stop -m immediate`): every backend exits at
        once without a checkpoint, and the next start recovers from the WAL."""
        process, self.process = self.process, None
        if process is not None:
            process.send_signal(signal.SIGQUIT)
            process.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit); SIGKILL
        after `timeout`. Returns postgres's exit status."""
        process, self.process = self.process, None
        code: int | None = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
