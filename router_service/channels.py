"""gRPC channels shared by the destinations that deliver to the same server.

A channel per destination cost ten thousand channels (and their start-up) for ten thousand
destinations of one sink; destinations are configuration, servers are few. Channels are
kept per target, TLS setting and the addresses the target resolved to, counted by the senders
using them, and closed when the last lets go (an endpoint changed, a name resolved elsewhere,
a lane closed) or the router stops.

gRPC would resolve a name itself, in C, where no policy can look at the answer. So a channel
is made to the addresses the router's resolver checked (router_service.resolver), written as
`ipv4:`/`ipv6:` targets: gRPC connects to exactly those and resolves nothing. The name the
operator wrote stays the call's authority and, over TLS, the name the certificate must carry.
No HTTP CONNECT proxy from the environment (grpc_proxy, https_proxy) is used: a proxy would
connect to wherever the name led it, past the check.
"""

from __future__ import annotations

import ipaddress

import grpc

from relayq.endpoints import GrpcEndpoint
from relayq.netpolicy import IPAddress
from router_service.resolver import Resolver

_Key = tuple[GrpcEndpoint, tuple[IPAddress, ...]]


class GrpcChannels:
    def __init__(self, credentials: grpc.ChannelCredentials, resolver: Resolver) -> None:
        self._credentials = credentials
        self.resolver = resolver
        self._open: dict[_Key, tuple[grpc.aio.Channel, int]] = {}

    async def addresses(self, endpoint: GrpcEndpoint) -> tuple[IPAddress, ...]:
        """Where `endpoint` leads now, checked: resolver.BlockedAddress or OSError if nowhere
        it may."""
        return await self.resolver.addresses(endpoint.host)

    def acquire(self, endpoint: GrpcEndpoint, addresses: tuple[IPAddress, ...]
                ) -> grpc.aio.Channel:
        key = (endpoint, addresses)
        channel, users = self._open.get(key, (None, 0))
        if channel is None:
            channel = _channel(endpoint, addresses, self._credentials)
        self._open[key] = (channel, users + 1)
        return channel

    async def release(self, endpoint: GrpcEndpoint, addresses: tuple[IPAddress, ...]) -> None:
        key = (endpoint, addresses)
        channel, users = self._open[key]
        if users > 1:
            self._open[key] = (channel, users - 1)
            return
        del self._open[key]
        await channel.close(None)

    async def close(self) -> None:
        channels = [channel for channel, _ in self._open.values()]
        self._open.clear()
        for channel in channels:
            await channel.close(None)


def pinned_target(endpoint: GrpcEndpoint, addresses: tuple[IPAddress, ...]) -> str:
    """A target naming the addresses themselves, of the first one's family (gRPC's ipv4: and
    ipv6: schemes take one family each; it tries them in order)."""
    port = endpoint.target.rpartition(":")[2]
    family = addresses[0].version
    same = [address for address in addresses if address.version == family]
    if family == 4:
        return "ipv4:" + ",".join(f"{address}:{port}" for address in same)
    return "ipv6:" + ",".join(f"[{address}]:{port}" for address in same)


def _channel(endpoint: GrpcEndpoint, addresses: tuple[IPAddress, ...],
             credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    host = endpoint.host
    options: list[tuple[str, str | int]] = [
        ("grpc.default_authority", endpoint.target),
        ("grpc.enable_http_proxy", 0),
    ]
    target = pinned_target(endpoint, addresses)
    if not endpoint.tls:
        return grpc.aio.insecure_channel(target, options=options)
    # The certificate is checked against the name written (or the literal address).
    try:
        ipaddress.ip_address(host)
    except ValueError:
        options.append(("grpc.ssl_target_name_override", host))
    return grpc.aio.secure_channel(target, credentials, options=options)
