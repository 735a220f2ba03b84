"""Whether a process can listen where it is configured to, asked before anything else starts.

gRPC reports a port it cannot bind as a log line of its own (`add_port.cc ... Address already
in use`) and a bare RuntimeError, and only once the process has opened pools and started
background tasks. Binding a plain socket first, the way gRPC will (SO_REUSEADDR, so a port in
TIME_WAIT after a restart is usable; no SO_REUSEPORT, so a port another process listens on is
refused rather than shared), lets the process stop at once with one line naming the variable.
A port taken between this check and the real bind is still reported the same way by the server.

Workers (relayq.supervisor) share one port with SO_REUSEPORT. Their supervisor checks the port
as above, so a port someone else listens on is still refused, then `reserve`s it: a socket
bound with SO_REUSEPORT alone and never listening, held for the supervisor's life. It takes no
connections, but nothing can bind the port any more except sockets that set SO_REUSEPORT too
under the same user: the workers (each checks with `shared=True`), also while one restarts.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

_PLAIN_REASONS = {errno.EADDRINUSE: "address already in use",
                  errno.EADDRNOTAVAIL: "no interface of this machine has that address",
                  errno.EACCES: "permission denied (ports below 1024 need privileges)"}


class AddressUnusable(Exception):
    """A listen address cannot be bound. The message names the variable and the address."""

    def __init__(self, variable: str, address: str, reason: str) -> None:
        super().__init__(f"{variable}={address}: {reason}")
        self.variable = variable
        self.address = address


def reason(exc: OSError) -> str:
    if exc.errno in _PLAIN_REASONS:
        return _PLAIN_REASONS[exc.errno]
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)


def split(address: str) -> tuple[str, int]:
    """host:port (IPv6 hosts in brackets) as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check(variable: str, address: str, *, shared: bool = False) -> None:
    """Raise AddressUnusable unless every address `address` resolves to can be bound now.
    Port 0 (the system chooses) always can. `shared`: bind as a worker sharing the port does
    (SO_REUSEPORT), beside its supervisor's reservation and the other workers."""
    if split(address)[1] == 0:
        return
    for family, kind, proto, where in _resolve(variable, address):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(where)
            except OSError as exc:
                raise AddressUnusable(variable, address, reason(exc)) from None


class Reservation:
    """A port held for workers that share it (see the module's docstring)."""

    def __init__(self, address: str, sockets: list[socket.socket]) -> None:
        # host:port with the port bound (the one the system chose, for port 0).
        self.address = address
        self._sockets = sockets

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def reserve(variable: str, address: str) -> Reservation:
    """Check `address` as `check` does, then hold it for workers sharing it."""
    check(variable, address)
    host, port = split(address)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, where in _resolve(variable, address):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if port:
                where = (where[0], port, *where[2:])
            try:
                sock.bind(where)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise AddressUnusable(variable, address, reason(exc)) from None
                # Connections of an earlier server left in TIME_WAIT: `check` found nobody
                # listening, so bind as it does.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(where)
                except OSError as again:
                    raise AddressUnusable(variable, address, reason(again)) from None
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    return Reservation(f"{shown}:{port}", sockets)


def _resolve(variable: str, address: str) -> list[tuple[int, int, int, tuple[Any, ...]]]:
    host, port = split(address)
    try:
        resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressUnusable(variable, address, f"cannot resolve {host!r}: {exc}") from None
    return [(family, kind, proto, where) for family, kind, proto, _, where in resolved]
