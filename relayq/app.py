"""What the three services' app objects share: built from a config, serving on a port.

Tests start apps in-process (`await IngestApp.start(config)`) and processes run them through
relayq.process.main; both need the same start and the ports a running server bound.
"""

from __future__ import annotations

import logging
from typing import Generic, Self, TypeVar

from relayq.server import RunningServer

log = logging.getLogger(__name__)

Config = TypeVar("Config")


class ServiceApp(Generic[Config]):
    def __init__(self, config: Config) -> None:
        self.config = config
        self._server: RunningServer | None = None

    @classmethod
    async def start(cls, config: Config) -> Self:
        """Start the app; if that fails (or is cancelled) part way, stop what had started.

        A failure late in a start (its port taken, say) comes after pools, listeners and
        the like are running; left alone, their tasks would keep the process alive."""
        app = cls(config)
        try:
            await app._start()
        except BaseException:
            try:
                await app.stop()
            except Exception:
                log.exception("stopping after a failed start failed too")
            raise
        return app

    async def _start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop whatever is running, even after a start that failed part way."""
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
