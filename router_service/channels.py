"""gRPC channels shared by the destinations that deliver to the same server.

A channel per destination cost ten thousand channels (and their start-up) for ten thousand
destinations of one sink; destinations are configuration, servers are few. Channels are
kept per target and TLS setting, counted by the senders using them, and closed when the
last lets go (an endpoint changed, a lane closed) or the router stops.
"""

from __future__ import annotations

import grpc

from relayq.endpoints import GrpcEndpoint


class GrpcChannels:
    def __init__(self, credentials: grpc.ChannelCredentials) -> None:
        self._credentials = credentials
        self._open: dict[GrpcEndpoint, tuple[grpc.aio.Channel, int]] = {}

    def acquire(self, endpoint: GrpcEndpoint) -> grpc.aio.Channel:
        channel, users = self._open.get(endpoint, (None, 0))
        if channel is None:
            channel = (grpc.aio.secure_channel(endpoint.target, self._credentials)
                       if endpoint.tls else grpc.aio.insecure_channel(endpoint.target))
        self._open[endpoint] = (channel, users + 1)
        return channel

    async def release(self, endpoint: GrpcEndpoint) -> None:
        channel, users = self._open[endpoint]
        if users > 1:
            self._open[endpoint] = (channel, users - 1)
            return
        del self._open[endpoint]
        await channel.close(None)

    async def close(self) -> None:
        channels = [channel for channel, _ in self._open.values()]
        self._open.clear()
        for channel in channels:
            await channel.close(None)
