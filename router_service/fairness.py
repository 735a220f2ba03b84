"""Delivery capacity shared fairly: first across tenants, then across a tenant's destinations.

A router has a fixed number of delivery permits (requests in flight at once, whatever their
destination). When permits run short, a free one goes to the next tenant in round-robin order
that has a destination waiting, and within that tenant to its next waiting destination. So a
tenant flooding one destination gets its share of the router and no more: another tenant's
event waits at most for one permit to come free, not behind the flood's backlog. Each
destination's own concurrency limit is enforced by its lane, before it asks here.

Permits are rarely what runs short, though: the router's CPU is. A tenant flooding the router
keeps its event loop busy with the callbacks of everything it has in flight, and another
tenant's event, which needs a few turns of that loop to be read and sent, waits a few times
that queue (measured: 56-82 ms at p99 from ingest to dispatch under a flood, against 3-20 ms
alone). So the scheduler is also told how late the loop runs (`loop_lag`, each second): while
it runs late and more than one tenant is delivering, the tenant with the most in flight is
capped at half of that (multiplicative decrease, once a second), and the cap grows back by a
tenth while the loop keeps up (additive increase), as TCP does with a congested link. Fewer of
the heavy tenant's deliveries in flight is a shorter loop for everyone; the light tenant,
under its share, is never capped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable

# The loop is late when a timer fires this much after its time (seconds), and keeps up below
# the second figure.
LAG_HIGH = 0.005
LAG_LOW = 0.002
# A tenant counts as delivering if it took a permit this recently (seconds).
ACTIVE_WINDOW = 2.0
# A capped tenant keeps at least this many deliveries in flight.
CAP_FLOOR = 2


class FairScheduler:
    def __init__(self, permits: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.permits = permits
        self.in_use = 0
        self._clock = clock
        self._in_use_by: Counter[Hashable] = Counter()
        self._last_taken: dict[Hashable, float] = {}
        # Tenants held below the permits while the loop runs late: tenant -> in flight at most.
        self.caps: dict[Hashable, int] = {}
        # tenant -> destination -> waiters, each level in round-robin order.
        self._waiting: OrderedDict[Hashable, OrderedDict[Hashable, deque[asyncio.Future[None]]]]
        self._waiting = OrderedDict()

    async def acquire(self, tenant: Hashable, destination: Hashable) -> None:
        if self.in_use < self.permits and not self._waiting and self._may_take(tenant):
            self._take(tenant)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, OrderedDict()).setdefault(destination, deque()).append(
            future)
        self._grant()  # others may wait at their cap while a permit is free for this one
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(tenant)  # granted just as we were cancelled: hand it on
            else:
                self._forget(tenant, destination, future)
            raise

    def release(self, tenant: Hashable) -> None:
        self.in_use -= 1
        self._in_use_by[tenant] -= 1
        if self._in_use_by[tenant] <= 0:
            del self._in_use_by[tenant]
        self._grant()

    def loop_lag(self, lag: float) -> None:
        """How late the event loop ran lately (seconds); called about once a second."""
        now = self._clock()
        active = [t for t, at in self._last_taken.items() if now - at < ACTIVE_WINDOW]
        for tenant in [t for t in self._last_taken if t not in active]:
            del self._last_taken[tenant]
            self.caps.pop(tenant, None)
        if lag > LAG_HIGH and len(active) > 1:
            heaviest = max(active, key=lambda t: self._in_use_by.get(t, 0))
            in_flight = self._in_use_by.get(heaviest, 0)
            if in_flight > CAP_FLOOR:
                self.caps[heaviest] = max(CAP_FLOOR, in_flight // 2)
        elif lag < LAG_LOW:
            for tenant, cap in list(self.caps.items()):
                cap += max(1, cap // 10)
                if cap >= self.permits:
                    del self.caps[tenant]
                else:
                    self.caps[tenant] = cap
            self._grant()
        if len(active) <= 1:
            self.caps.clear()
            self._grant()

    @property
    def waiting(self) -> int:
        return sum(len(w) for d in self._waiting.values() for w in d.values())

    def _may_take(self, tenant: Hashable) -> bool:
        cap = self.caps.get(tenant)
        return cap is None or self._in_use_by.get(tenant, 0) < cap

    def _take(self, tenant: Hashable) -> None:
        self.in_use += 1
        self._in_use_by[tenant] += 1
        self._last_taken[tenant] = self._clock()

    def _grant(self) -> None:
        """Free permits to waiters, tenants in turn, skipping tenants at their cap."""
        passed = 0
        while self._waiting and self.in_use < self.permits and passed < len(self._waiting):
            tenant, destinations = next(iter(self._waiting.items()))
            if not self._may_take(tenant):
                self._waiting.move_to_end(tenant)
                passed += 1
                continue
            passed = 0
            future = self._next(tenant, destinations)
            if not future.done():
                self._take(tenant)
                future.set_result(None)

    def _next(self, tenant: Hashable,
              destinations: OrderedDict[Hashable, deque[asyncio.Future[None]]]
              ) -> asyncio.Future[None]:
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
