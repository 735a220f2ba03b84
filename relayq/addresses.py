"""Whether a process can listen where it is configured to, asked before anything else starts.

gRPC reports a port it cannot bind as a log line of its own (`add_port.cc ... Address already
in use`) and a bare RuntimeError, and only once the process has opened pools and started
background tasks. Binding a plain socket first, the way gRPC will (SO_REUSEADDR, so a port in
TIME_WAIT after a restart is usable; no SO_REUSEPORT, so a port another process listens on is
refused rather than shared), lets the process stop at once with one line naming the variable.
A port taken between this check and the real bind is still reported the same way by the server.
"""

from __future__ import annotations

import errno
import os
import socket

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


def check(variable: str, address: str) -> None:
    """Raise AddressUnusable unless every address `address` resolves to can be bound now.
    Port 0 (the system chooses) always can."""
    host, port = split(address)
    if port == 0:
        return
    try:
        resolved = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise AddressUnusable(variable, address, f"cannot resolve {host!r}: {exc}") from None
    for family, kind, proto, _, where in resolved:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(where)
            except OSError as exc:
                raise AddressUnusable(variable, address, reason(exc)) from None
