"""A LISTEN connection that stays up: notifications are wake-up hints, never the only signal.

Postgres drops notifications sent while a listener is disconnected, so every connection (the
first one too) calls `on_reconnect`, where users re-read whatever they cache or poll once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping

import backoff
import psycopg
from psycopg import sql

from jobsdb.pool import connect_kwargs

log = logging.getLogger(__name__)

Handler = Callable[[str], None]


class Listener:
    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler],
        *,
        application_name: str,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._handlers = dict(handlers)
        self._application_name = application_name
        self._on_reconnect = on_reconnect
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with jittered exponential backoff."""
        waits = _backoff()
        while True:
            try:
                await self._listen_once()
                reason = "the server closed the connection"
            except (psycopg.Error, OSError) as exc:
                reason = str(exc)
            if self.connected.is_set():
                waits = _backoff()  # it worked for a while: start the backoff over
            self.connected.clear()
            pause = next(waits)
            log.warning("listener disconnected (%s); reconnecting in %.2fs", reason, pause)
            await asyncio.sleep(pause)

    async def _listen_once(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._dsn, autocommit=True, **connect_kwargs(self._application_name)
        ) as conn:
            for channel in self._handlers:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.connected.set()
            # Also on the first connection: whatever was notified between the caller's start
            # and this LISTEN is lost (a config change right after start, say).
            if self._on_reconnect is not None:
                self._on_reconnect()
            async for notification in conn.notifies():
                handler = self._handlers.get(notification.channel)
                if handler is not None:
                    handler(notification.payload)


def _backoff() -> Iterator[float]:
    waits = backoff.expo(base=2, factor=0.05, max_value=5)
    next(waits)  # backoff's generators yield None first
    return (backoff.full_jitter(w) for w in waits)
