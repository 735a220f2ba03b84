"""What every relayq service process does around its app: config, logs, signals, exit codes.

Exit status 2: bad configuration (the message names the variable); 1: the database could not
be prepared (unreachable, outdated schema); 0: a clean shutdown after SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from jobsdb.errors import JobsDBError
from relayq import logs, runtime
from relayq.config import ConfigError, Env
from relayq.server import shutdown_event

log = logging.getLogger(__name__)

Config = TypeVar("Config")


class App(Protocol):
    async def stop(self) -> None: ...


def main(name: str, load: Callable[[Env], Config],
         start: Callable[[Config], Awaitable[App]]) -> None:
    """Read the configuration, run the app until a signal, stop it cleanly."""
    env = Env()
    try:
        config = load(env)
        logs.configure_from_env(env)
    except ConfigError as exc:
        print(f"{name}: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)

    async def serve() -> None:
        stop = shutdown_event()
        app = await start(config)
        await stop.wait()
        log.info("shutting down", extra={"service": name})
        await app.stop()

    try:
        runtime.run(serve())
    except JobsDBError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(1)
