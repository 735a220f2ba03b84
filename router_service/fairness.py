"""Delivery capacity shared fairly: first across tenants, then across a tenant's destinations.

A router has a fixed number of delivery permits (requests in flight at once, whatever their
destination). When permits run short, a free one goes to the next tenant in round-robin order
that has a destination waiting, and within that tenant to its next waiting destination. So a
tenant flooding one destination gets its share of the router and no more: another tenant's
event waits at most for one permit to come free, not behind the flood's backlog. Each
destination's own concurrency limit is enforced by its lane, before it asks here.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable


class FairScheduler:
    def __init__(self, permits: int) -> None:
        self.permits = permits
        self.in_use = 0
        # tenant -> destination -> waiters, each level in round-robin order.
        self._waiting: OrderedDict[Hashable, OrderedDict[Hashable, deque[asyncio.Future[None]]]]
        self._waiting = OrderedDict()

    async def acquire(self, tenant: Hashable, destination: Hashable) -> None:
        if self.in_use < self.permits and not self._waiting:
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, OrderedDict()).setdefault(destination, deque()).append(
            future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: hand it on
            else:
                self._forget(tenant, destination, future)
            raise

    def release(self) -> None:
        self.in_use -= 1
        while self._waiting and self.in_use < self.permits:
            future = self._next()
            if future is not None and not future.done():
                self.in_use += 1
                future.set_result(None)

    @property
    def waiting(self) -> int:
        return sum(len(w) for d in self._waiting.values() for w in d.values())

    def _next(self) -> asyncio.Future[None] | None:
        tenant, destinations = next(iter(self._waiting.items()))
        destination, waiters = next(iter(destinations.items()))
        future = waiters.popleft()
        # Move both to the back of their round-robin order (or drop them if done waiting).
        destinations.pop(destination)
        if waiters:
            destinations[destination] = waiters
        self._waiting.pop(tenant)
        if destinations:
            self._waiting[tenant] = destinations
        return future

    def _forget(self, tenant: Hashable, destination: Hashable,
                future: asyncio.Future[None]) -> None:
        destinations = self._waiting.get(tenant)
        if destinations is None:
            return
        waiters = destinations.get(destination)
        if waiters is not None and future in waiters:
            waiters.remove(future)
            if not waiters:
                del destinations[destination]
        if not destinations:
            del self._waiting[tenant]
