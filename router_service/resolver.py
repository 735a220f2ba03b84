"""The addresses a destination's host name leads to, checked against the network policy
(relayq.netpolicy) before anything connects: the one place every sender asks.

Every attempt asks, for every destination type: the webhook client, the gRPC channels and the
NATS connections then connect to exactly the addresses returned, as literals, so nothing
resolves the name again between the check and the connect (no DNS rebinding), and a name
that later resolves elsewhere is checked again. A name is refused when any address it
resolves to is: a connection would pick one of them, and which is not ours to predict.

Lookups are cached for CACHE_SECONDS (getaddrinfo tells no TTL): a lookup goes to a thread
and costs tens of microseconds, several times the rest of a webhook request, and a busy
destination makes hundreds of requests a second. Within that time every attempt connects to
the addresses checked, so the cache can delay seeing a new answer, never let an unchecked one
through. Failed lookups are not cached. Literal addresses (numeric forms as inet_aton reads
them included) never reach DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from relayq import netpolicy
from relayq.netpolicy import IPAddress, NetworkPolicy
from router_service.retry import BLOCKED_ADDRESS

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0

Lookup = Callable[[str], Awaitable[list[IPAddress]]]


class BlockedAddress(Exception):
    """The destination leads to an address the policy refuses. Not an OSError: it is never
    retried as a connection error would be. The message is what the tenant reads (a name's
    addresses are not in it: a tenant must not learn what internal names resolve to)."""

    error_code = BLOCKED_ADDRESS

    def __init__(self, host: str, refused: netpolicy.Refused, *, literal: bool) -> None:
        super().__init__(netpolicy.explain(refused, None if literal else host))
        self.host = host
        self.refused = refused


async def system_lookup(host: str) -> list[IPAddress]:
    """getaddrinfo, on the event loop's resolver threads; OSError (socket.gaierror) when the
    name does not resolve. Tests replace it with a stub resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    found: list[IPAddress] = []
    for _, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if address not in found:
            found.append(address)
    return found


class Resolver:
    """Resolves and checks hosts for every sender of one router."""

    def __init__(self, policy: NetworkPolicy, *, cache_seconds: float | None = None,
                 lookup: Lookup | None = None) -> None:
        self.policy = policy
        self._cache_seconds = CACHE_SECONDS if cache_seconds is None else cache_seconds
        self._lookup = lookup
        # host -> (good until (monotonic; inf for literals), addresses)
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = {}
        # Refusals already logged, so a blocked destination is one warning, not one a try.
        self._logged: set[tuple[str, IPAddress]] = set()

    async def addresses(self, host: str) -> tuple[IPAddress, ...]:
        """The addresses to connect to for `host`, in the resolver's order, every one allowed;
        BlockedAddress if any is refused, OSError if the name does not resolve."""
        cached = self._cache.get(host)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        literal = netpolicy.literal(host)
        found: tuple[IPAddress, ...]
        if literal is not None:
            found, until = (literal,), float("inf")
        else:
            lookup = self._lookup or system_lookup
            found = tuple(await lookup(host))
            if not found:
                raise OSError(f"{host!r} resolves to no address")
            until = time.monotonic() + self._cache_seconds
        for address in found:
            try:
                self.policy.check(address)
            except netpolicy.Refused as refused:
                self._cache.pop(host, None)
                self._log(host, refused)
                raise BlockedAddress(host, refused, literal=literal is not None) from None
        if len(self._cache) > 10_000:  # hosts of destinations long gone
            self._cache.clear()
        self._cache[host] = (until, found)
        return found

    def _log(self, host: str, refused: netpolicy.Refused) -> None:
        key = (host, refused.address)
        if key not in self._logged:
            self._logged.add(key)
            log.warning("refused to connect to %s: it resolves to %s, which is %s (%s)", host,
                        refused.address, refused.rule, netpolicy.ALLOW_VARIABLE,
                        extra={"host": host, "address": str(refused.address),
                               "rule": refused.rule})
