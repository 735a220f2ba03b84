"""Reads of runnable jobs, grouped across destinations.

Each lane reads its own destination's jobs. With fifty busy destinations that is fifty large
reads, and the statement's cost disappears into the jobs it returns. With ten thousand
destinations that each have a few jobs, it is ten thousand small statements, each a pool
checkout, a round trip and a plan, for three jobs apiece: measured, the router spent 830 us of
CPU per job and lanes queued for connections until the pool timed them out.

So lanes ask the reader, and the reader sends every read that is waiting in one statement
(`pickup_many`), the way ingest shares commits: a read that arrives while the reader is idle
goes at once, and the ones that arrive while a statement runs go together in the next. A lane
that holds many jobs reads alone: a busy destination's read returns hundreds of jobs, so its
statement costs little per job, and its thousands of held ids would make every grouped
statement ship and hash them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NamedTuple

from psycopg_pool import AsyncConnectionPool

from jobsdb import queue
from jobsdb.pool import transaction
from jobsdb.queue import Candidate, Wanted
from relayq.tasks import cancel_and_wait
from router_service import metrics


class Read(NamedTuple):
    candidates: list[Candidate]
    # True when the read found everything runnable (fewer jobs than it asked for).
    complete: bool


@dataclass
class _Request:
    wanted: Wanted
    exclude: tuple[int, ...]
    partitions: frozenset[int]
    future: asyncio.Future[list[Candidate]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Reader:
    def __init__(self, pool: AsyncConnectionPool, *, alone_above: int, max_rows: int,
                 concurrency: int) -> None:
        # A lane holding more than `alone_above` jobs reads alone.
        self._pool = pool
        self._alone_above = alone_above
        # Rows a grouped statement may return at most (the sum of its reads' limits).
        self._max_rows = max_rows
        self._concurrency = concurrency
        self._waiting: list[_Request] = []
        self._arrived = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"reader-{n}")
                         for n in range(self._concurrency)]

    async def close(self) -> None:
        """Stop; reads waiting or running are cancelled (the engine closes lanes first)."""
        self._closed = True
        await cancel_and_wait(self._workers)
        for request in self._waiting:
            request.future.cancel()
        self._waiting.clear()

    async def pickup(self, destination_key: int, limit: int, partitions: frozenset[int],
                     exclude: Collection[int]) -> Read:
        """Up to `limit` runnable jobs of the destination in job order (jobsdb.queue.pickup)."""
        if self._closed:
            raise RuntimeError("the reader is closed")
        exclude = tuple(exclude)  # as the lane holds them now, not after waiting for a turn
        if len(exclude) > self._alone_above:
            metrics.PICKUP_STATEMENTS.labels("alone").inc()
            async with transaction(self._pool) as conn:
                found = await queue.pickup(conn, destination_key=destination_key, limit=limit,
                                           partitions=sorted(partitions), exclude=exclude)
            return Read(found, complete=len(found) < limit)
        # A grouped read asks for at most `alone_above` jobs: a destination with more is busy,
        # its full read says so, and once it holds that many it reads alone.
        limit = min(limit, self._alone_above or limit)
        request = _Request(Wanted(destination_key, limit), exclude, partitions)
        self._waiting.append(request)
        self._arrived.set()
        found = await request.future
        return Read(found, complete=len(found) < limit)

    async def _work(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take()
            if not batch:
                continue
            try:
                async with transaction(self._pool) as conn:
                    found = await queue.pickup_many(
                        conn, [r.wanted for r in batch], partitions=sorted(batch[0].partitions),
                        exclude=itertools.chain.from_iterable(r.exclude for r in batch))
            except asyncio.CancelledError:
                for request in batch:
                    request.future.cancel()
                raise
            except Exception as exc:  # each lane decides what a failed read means to it
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            metrics.PICKUP_STATEMENTS.labels("grouped").inc()
            for request in batch:
                if not request.future.done():  # its lane may have been closed meanwhile
                    request.future.set_result(found[request.wanted.destination_key])

    def _take(self) -> list[_Request]:
        """The oldest waiting reads that fit one statement: same partitions, rows capped, one
        read per destination (a closed lane's read may still wait beside its successor's).

        Every lane reads with the router's current partitions, so they differ only for the
        moment a lease changes hands; a read that differs waits for the next statement.
        """
        partitions = self._waiting[0].partitions
        batch: list[_Request] = []
        skipped: list[_Request] = []
        destinations: set[int] = set()
        rows = 0
        taken = 0
        for request in self._waiting:
            if batch and rows + request.wanted.limit > self._max_rows:
                break
            taken += 1
            key = request.wanted.destination_key
            if request.future.done():
                continue  # its lane was closed while it waited
            if request.partitions == partitions and key not in destinations:
                batch.append(request)
                destinations.add(key)
                rows += request.wanted.limit
            else:
                skipped.append(request)
        self._waiting = skipped + self._waiting[taken:]
        return batch

