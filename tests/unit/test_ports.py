"""Port choice for processes started later: free, and never where outgoing connections land."""

from __future__ import annotations

import socket
from pathlib import Path

from relayq import ports


def ephemeral_range() -> tuple[int, int]:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def test_a_chosen_port_is_free_and_below_the_ephemeral_range() -> None:
    low, _ = ephemeral_range()
    chosen = {ports.free_port() for _ in range(50)}
    assert all(port < low for port in chosen)
    assert len(chosen) > 1  # random, so two processes choosing at once rarely collide
    for port in chosen:
        with socket.socket() as sock:
            # As servers bind (gRPC, aiohttp and Postgres all set it): a port of an earlier
            # test's server may still be in TIME_WAIT, which only this lets a listener reuse.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_the_preferred_port_is_kept_when_free_and_left_when_taken() -> None:
    free = ports.free_port()
    assert ports.free_port(preferred=free) == free
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", free))
        taken.listen()
        assert not ports.port_is_free(free)
        assert ports.free_port(preferred=free) != free
