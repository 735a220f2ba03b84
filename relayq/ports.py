"""Choosing a port for a process that will bind it later.

The usual trick (bind port 0, read the number, close) returns a port from the kernel's
ephemeral range, the same range it hands out as the local end of every outgoing connection.
Between choosing the port and a child process binding it, any connection on the machine (a
Postgres client, a connection pool filling up) can take it; CI saw an admin server fail to start
that way. Ports below the ephemeral range are only ever taken by something asking for them by
number, so that is where we look first.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20000
_TRIES = 200


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens there, else a free port outside the ephemeral range."""
    if preferred and port_is_free(preferred, host):
        return preferred
    below = _ephemeral_low()
    if below - _LOWEST >= 1000:
        for _ in range(_TRIES):
            port = random.randrange(_LOWEST, below)
            if port_is_free(port, host):
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere only a guess, and the fallback still works.
