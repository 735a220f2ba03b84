"""What the three services' app objects share: built from a config, serving on a port.

Tests start apps in-process (`await IngestApp.start(config)`) and processes run them through
relayq.process.main; both need the same start and the ports a running server bound.
"""

from __future__ import annotations

from typing import Generic, Self, TypeVar

from relayq.server import RunningServer

Config = TypeVar("Config")


class ServiceApp(Generic[Config]):
    def __init__(self, config: Config) -> None:
        self.config = config
        self._server: RunningServer | None = None

    @classmethod
    async def start(cls, config: Config) -> Self:
        app = cls(config)
        await app._start()
        return app

    async def _start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int:
        """The gRPC port it serves (the one bound, when configured as port 0)."""
        assert self._server is not None, "not started"
        return self._server.port

    @property
    def metrics_port(self) -> int | None:
        assert self._server is not None, "not started"
        return self._server.metrics_port
