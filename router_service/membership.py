"""This router's share of the ordering-key space: heartbeats, leases, rebalancing, fencing.

Every heartbeat (a third of the lease) renews this router's leases, counts the live routers and
moves toward a fair share: taking free or expired partitions when it has too few; when it has
too many (a router joined), it first stops reading them, lets what it has in flight for them
finish and be recorded, and only then gives them back, so their jobs never go to two routers at
once. A router that cannot renew in time stops delivering before its leases can expire
(`usable` turns empty a safety margin early): by the time another router may take them over,
this one has let go. A lease that ran out while nobody took it (Postgres unreachable for
longer than the lease) is still this router's: the next heartbeat renews it and the router
goes on with what it knows of the partition, which its owner-fenced writes kept true (see
jobsdb/sql/leases.sql, renew); only a partition another router took is lost.

Letting go includes what is in flight: when the lease can no longer be proven (`on_fenced`,
called the moment the validity lapses without a renewal), the router cancels its open
deliveries, so no attempt outlives the lease it started under and a new owner never delivers
a user's later jobs while an earlier one of theirs is still on its way from here. A heartbeat
that hangs (a stalled connection) is given up on after an interval, so the next one can try.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta

from psycopg_pool import AsyncConnectionPool

from jobsdb import leases
from jobsdb.errors import JobsDBError
from jobsdb.pool import transaction
from router_service import metrics
from router_service.identity import Identity

log = logging.getLogger(__name__)


class Membership:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        router_id: str,
        lease: timedelta,
        *,
        on_change: Callable[[set[int], set[int]], None],
        busy: Callable[[int], bool],
        on_fenced: Callable[[], None] = lambda: None,
        identity: Identity | None = None,
    ) -> None:
        self._pool = pool
        self.router_id = router_id
        self.lease = lease
        self._on_change = on_change  # (gained, lost)
        self._busy = busy  # does this router still hold jobs of that partition?
        self._on_fenced = on_fenced  # the lease can no longer be proven: stop what is in flight
        # Proves no other live router has our id (None: not checked, for tests of leases).
        self._identity = identity
        self._fence_timer: asyncio.TimerHandle | None = None
        # Heartbeats given up on while their statement hung; they end by themselves.
        self._hung: set[asyncio.Task[None]] = set()
        self._applied = 0.0  # when the newest heartbeat applied here began (monotonic)
        self._usable: frozenset[int] = frozenset()  # owned - releasing, as of the last beat
        self.owned: set[int] = set()
        self.releasing: set[int] = set()
        self.partition_count = 0
        self.live_routers = 0
        self._valid_until = 0.0  # monotonic
        self.changed = asyncio.Event()

    @property
    def interval(self) -> float:
        return self.lease.total_seconds() / 3

    def usable(self) -> frozenset[int]:
        """Partitions this router may deliver right now (every lane asks on every wake-up:
        the set is made once per change, not per question)."""
        if time.monotonic() >= self._valid_until:
            return frozenset()
        return self._usable

    def may_deliver(self, partition: int) -> bool:
        """Checked for each job as it is sent: a lane may have waited (for a read, a permit)
        since it last looked at `usable`, and the partition may have gone meanwhile."""
        return (partition in self.owned and partition not in self.releasing
                and time.monotonic() < self._valid_until)

    @property
    def lease_remaining(self) -> float:
        return max(0.0, self._valid_until - time.monotonic())

    async def run(self) -> None:
        while True:
            try:
                await self.beat_within(self.interval)
            except JobsDBError as exc:
                log.warning("heartbeat failed: %s", exc, extra={"router": self.router_id})
            await asyncio.sleep(self.interval)

    async def beat_within(self, seconds: float) -> None:
        """A heartbeat, given up on after `seconds`: a statement stuck on a stalled
        connection must not keep the next heartbeat from trying (its task is left to end by
        itself; its late renewal, if any, is ignored)."""
        task = asyncio.create_task(self.beat(), name="heartbeat")
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if task in done:
            task.result()
            return
        self._hung.add(task)
        task.add_done_callback(self._hung_done)
        metrics.HEARTBEAT_TIMEOUTS.inc()
        log.warning("heartbeat did not answer within %.1fs", seconds,
                    extra={"router": self.router_id})

    def _hung_done(self, task: asyncio.Task[None]) -> None:
        self._hung.discard(task)
        if not task.cancelled():
            task.exception()  # seen, and already reported as the timeout

    async def beat(self) -> None:
        started = time.monotonic()
        was_fenced = started >= self._valid_until
        if self._identity is not None and not await self._identity.held():
            return  # not renewing: the leases lapse, and on_fenced stops our deliveries
        async with transaction(self._pool) as conn:
            membership = await leases.heartbeat(conn, self.router_id, self.lease)
            still = await leases.renew(conn, self.router_id, self.lease)
            share = membership.fair_share
            # Give back only what is over the share now: a router that was giving partitions
            # back when the one it gave them to left would otherwise release them and take
            # them again in the same beat, for ever, never delivering from them.
            over = max(0, len(still) - share)
            kept_back = len(self.releasing & still) > over
            if kept_back:
                self.releasing = set(sorted(self.releasing & still, reverse=True)[:over])
            drained = {p for p in self.releasing & still if not self._busy(p)}
            if drained:
                await leases.release(conn, self.router_id, drained)
                still -= drained
            gained = set()
            if len(still) < share:
                gained = await leases.acquire(conn, self.router_id, self.lease, share - len(still))
            await leases.forget_dead(conn)
        if started < self._applied:
            return  # a heartbeat given up on that answered after a newer one: stale
        self._applied = started
        # Fenced from when the heartbeat began, minus a margin for clocks and slow statements.
        self._valid_until = started + self.lease.total_seconds() - self.interval / 2
        self._arm_fence()
        lost = self.owned - still - drained
        if lost:
            log.warning("lost partitions to another router", extra={"partitions": sorted(lost)})
        self.owned = still | gained
        self.releasing &= self.owned
        excess = len(self.owned) - share
        if excess > 0:
            # Give back the highest-numbered ones once their jobs are done.
            self.releasing |= set(sorted(self.owned - self.releasing, reverse=True)[:excess])
        self._usable = frozenset(self.owned - self.releasing)
        self.partition_count = membership.partitions
        self.live_routers = membership.live_routers
        metrics.PARTITIONS_OWNED.set(len(self.owned - self.releasing))
        if gained or lost or drained or excess > 0:
            log.info("partitions", extra={"owned": len(self.owned), "gained": len(gained),
                                          "lost": len(lost), "released": len(drained),
                                          "routers": membership.live_routers})
            self._on_change(gained, lost | self.releasing)
            self.changed.set()
        elif kept_back:
            # Partitions it was giving back are its own again: every lane looks again.
            log.info("partitions kept", extra={"owned": len(self.owned)})
            self._on_change(set(), set())
        elif was_fenced and self.owned:
            # A late heartbeat fenced us off for a while (lanes skip their work meanwhile and
            # would otherwise sleep until the next change): the same partitions are usable
            # again, so every lane looks again.
            log.info("partitions usable again", extra={"owned": len(self.owned)})
            self._on_change(set(), set())

    def _arm_fence(self) -> None:
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        self._fence_timer = asyncio.get_running_loop().call_later(
            max(0.0, self._valid_until - time.monotonic()), self._fence_due)

    def _fence_due(self) -> None:
        self._fence_timer = None
        if time.monotonic() < self._valid_until:
            self._arm_fence()  # renewed meanwhile (the timer fired early)
            return
        if self.owned:
            log.warning("lease not renewed in time: stopping deliveries in flight",
                        extra={"router": self.router_id, "partitions": len(self.owned)})
            self._on_fenced()

    async def leave(self) -> None:
        """Release everything (clean shutdown, after in-flight work is recorded)."""
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None
        self._valid_until = 0.0
        try:
            async with transaction(self._pool) as conn:
                await leases.leave(conn, self.router_id)
        except JobsDBError as exc:
            log.warning("could not release leases (they expire by themselves): %s", exc)
        self.owned.clear()
        self._usable = frozenset()
        metrics.PARTITIONS_OWNED.set(0)
