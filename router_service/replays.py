"""The replay worker: makes running replays and backfills into job rows, a chunk at a time.

Every router runs one; a replay is worked on by one at a time (its row is locked for the
chunk's transaction, and the others skip it), so several routers share several replays and
a router that dies mid-chunk leaves nothing half-written: the chunk and the replay's new
position commit together (jobsdb.replays). The rows are then delivered by the row path like
any retried job; the worker only wakes the destination's lanes (NOTIFY relayq_jobs).

A replay waits while its destination has not passed the next event in the log (paused, an
open circuit, a backlog): that event is still to be delivered from the log, and a row beside
it would send it twice. Other replays go on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from psycopg_pool import AsyncConnectionPool

from jobsdb import replays
from jobsdb.errors import JobsDBError
from jobsdb.jobs import JOBS_CHANNEL
from jobsdb.pool import transaction
from relayq.tasks import cancel_and_wait
from router_service import metrics

log = logging.getLogger(__name__)


class ReplayWorker:
    def __init__(self, pool: AsyncConnectionPool, *, poll_seconds: float = 5.0,
                 wait_seconds: float = 0.5, chunk: int = replays.CHUNK) -> None:
        self._pool = pool
        self._poll_seconds = poll_seconds
        # How soon a replay waiting for its destination is looked at again.
        self._wait_seconds = wait_seconds
        self._chunk = chunk
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replays")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    def wake(self, _payload: str = "") -> None:
        """A replay was made (NOTIFY relayq_replays)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                waiting = await self._work()
            except JobsDBError as exc:
                log.warning("writing a replay's rows failed: %s", exc)
                waiting = True
            except Exception:
                log.exception("writing a replay's rows failed")
                waiting = True
            timeout = self._wait_seconds if waiting else self._poll_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _work(self) -> bool:
        """Write chunks of running replays until none has more to write now; True when one
        is waiting for its destination (look again soon)."""
        skip: list[str] = []
        while True:
            async with transaction(self._pool) as conn:
                replay = await replays.next_running(conn, skip=skip)
                if replay is None:
                    return bool(skip)
                chunk = await replays.write_chunk(conn, replay, chunk=self._chunk)
                if chunk.written:
                    await conn.execute("SELECT pg_notify(%s, %s)",
                                       (JOBS_CHANNEL, str(replay["destination_key"])))
            metrics.REPLAY_ROWS.labels(replay["kind"]).inc(chunk.written)
            if chunk.done:
                log.info("%s written", replay["kind"], extra={
                    "replay": replay["replay_id"],
                    "rows": replay["written"] + chunk.written})
            elif chunk.waiting and not chunk.written:
                skip.append(replay["replay_id"])
