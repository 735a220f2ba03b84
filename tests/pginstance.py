"""A Postgres instance of a test's own, for faults the shared server must never have: a
tablespace on a small tmpfs that a test fills up, and a small max_connections that a test
takes. Needs root (mount) and the server's binaries (/usr/lib/postgresql/15/bin); runs the
server as the `postgres` system user (Postgres refuses root). Everything is undone on exit,
failures included: the server stopped, the tmpfs unmounted, the folders removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from relayq.ports import free_port

BIN = Path(os.environ.get("RELAYQ_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "postgres"


def available() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (to mount a tmpfs)"
    if not (BIN / "initdb").exists():
        return f"needs PostgreSQL's server binaries in {BIN}"
    try:
        import pwd

        pwd.getpwnam(USER)
    except KeyError:
        return f"needs the {USER!r} system user"
    return None


@dataclass
class Instance:
    port: int
    root: Path
    # A folder on the small tmpfs, for a tablespace.
    space: Path

    def dsn(self, database: str = "postgres", user: str = USER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def execute(self, *statements: sql.Composable | str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def fill(self) -> Path:
        """Take every free byte of the tmpfs; returns the ballast file (delete it to give the
        space back)."""
        ballast = self.space.parent / "ballast"
        with contextlib.suppress(OSError), ballast.open("wb") as file:
            for size in (1 << 20, 1 << 13, 1 << 9):
                block = b"\0" * size
                while True:
                    try:
                        file.write(block)
                        file.flush()
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return ballast

    def used(self) -> tuple[int, int]:
        """(bytes used, bytes in all) of the tmpfs."""
        stat = os.statvfs(self.space)
        return ((stat.f_blocks - stat.f_bfree) * stat.f_frsize, stat.f_blocks * stat.f_frsize)

    def free(self) -> None:
        (self.space.parent / "ballast").unlink(missing_ok=True)


def _as_postgres(*command: str | Path) -> list[str]:
    return ["runuser", "-u", USER, "--", *map(str, command)]


@contextlib.contextmanager
def small_postgres(*, space_mb: int = 64, max_connections: int = 40) -> Iterator[Instance]:
    root = Path(tempfile.mkdtemp(prefix="relayq-pg-"))
    root.chmod(0o755)
    mount = root / "tmpfs"
    mount.mkdir()
    data = root / "data"
    mounted = started = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={space_mb}m,mode=0755", "tmpfs",
                        str(mount)], check=True)
        mounted = True
        space = mount / "space"
        space.mkdir()
        shutil.chown(space, USER, USER)
        shutil.chown(root, USER, USER)
        subprocess.run(_as_postgres(BIN / "initdb", "-D", data, "-U", USER, "--auth=trust",
                                    "-E", "UTF8", "--no-sync", "--no-instructions"),
                       check=True, capture_output=True)
        port = free_port()
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
                   f" -c max_connections={max_connections} -c fsync=off"
                   " -c superuser_reserved_connections=3 -c shared_buffers=16MB")
        subprocess.run(_as_postgres(BIN / "pg_ctl", "-D", data, "-o", options, "-w", "-t", "30",
                                    "-l", root / "postgres.log", "start"),
                       check=True, capture_output=True)
        started = True
        yield Instance(port, root, space)
    finally:
        if started:
            subprocess.run(_as_postgres(BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w",
                                        "stop"), capture_output=True)
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def log_tail(instance: Instance, lines: int = 30) -> str:
    try:
        return "\n".join((instance.root / "postgres.log").read_text().splitlines()[-lines:])
    except OSError:
        return ""
