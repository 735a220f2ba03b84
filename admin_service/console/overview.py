"""The overview's figures: GetStats for the caller's scope, shared and refreshed in the
background, then searched, sorted and paged in memory.

With 10,000 destinations a GetStats of everything takes a few hundred milliseconds, part of
it the admin's own CPU. Every open console polling its own would be that per viewer every few
seconds; instead one snapshot per scope (the operator's, or one tenant's) is kept, and every
viewer pages through it: a page answers from memory in milliseconds. A viewer finding the
snapshot older than `max_age` is answered from it still, and a refresh starts behind it
(stale-while-revalidate), so only the first viewer of a scope ever waits for a GetStats. A
refresh runs at most once per `max_age`, and never more often than twenty times its own cost
apart, so the console takes at most a twentieth of the admin's time however many watch it.
Snapshots nobody looked at for a quarter of an hour are dropped. Every page says how old its
figures are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from admin_service.ops import Operations
from relayq.auth import Caller
from relayq.v1 import admin_pb2

log = logging.getLogger("relayq.admin.console")

PER_PAGE = 50
# A refresh waits at least this many times as long as the last one took: the console's
# share of the admin (and of Postgres) stays under 5% however large the scope. At 10,000
# destinations (a GetStats of ~0.25 s) the figures are then about five seconds fresh.
COST_FACTOR = 20
# Figures nobody looked at for this long are dropped (memory: a few MB per 10,000
# destinations); the scope's next viewer then waits for a GetStats.
FORGET_SECONDS = 900.0

Stats = admin_pb2.DestinationStats

# Column name -> sort key; the first is the default order.
SORTS: dict[str, Callable[[Stats], Any]] = {
    "destination": lambda d: (d.destination_id, d.tenant_id),
    "tenant": lambda d: (d.tenant_id, d.destination_id),
    "pending": lambda d: d.counts.pending,
    "retrying": lambda d: d.counts.failed,
    "waiting": lambda d: d.counts.waiting,
    "oldest": lambda d: d.oldest_pending_seconds,
    "delivered": lambda d: d.delivered_per_second,
    "failed": lambda d: d.failed_per_second,
    "circuit": lambda d: (not d.circuit.open, d.destination_id),
    "paused": lambda d: (not d.paused, d.destination_id),
}


@dataclass
class Snapshot:
    rows: Sequence[Stats]
    taken: float
    _orders: dict[tuple[str, bool], list[Stats]] = field(default_factory=dict)
    _totals: dict[str, Totals] = field(default_factory=dict)

    def totals(self, search: str, rows: Sequence[Stats]) -> Totals:
        """The sums over `rows`, the ones `search` matches (kept per search)."""
        if search not in self._totals:
            self._totals[search] = _totals(rows)
        return self._totals[search]

    def ordered(self, sort: str, descending: bool) -> list[Stats]:
        key = (sort, descending)
        if key not in self._orders:
            self._orders[key] = sorted(self.rows, key=SORTS[sort], reverse=descending)
        return self._orders[key]


@dataclass(frozen=True)
class View:
    """What the overview asks for: a search, an order and a page (1-based)."""

    search: str = ""
    sort: str = "destination"
    descending: bool = False
    page: int = 1

    @classmethod
    def parse(cls, query: Any) -> View:
        sort = query.get("sort", "destination")
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        return cls(search=query.get("q", "").strip().lower()[:200],
                   sort=sort if sort in SORTS else "destination",
                   descending=query.get("dir", "") == "desc", page=page)


@dataclass(frozen=True)
class Totals:
    pending: int
    retrying: int
    waiting: int
    oldest_pending_seconds: float
    delivered_per_second: float
    failed_per_second: float


@dataclass(frozen=True)
class Table:
    rows: list[Stats]
    matched: int
    pages: int
    view: View
    totals: Totals
    # Seconds since the figures were read.
    age: float


def table(snapshot: Snapshot, view: View) -> Table:
    rows = snapshot.ordered(view.sort, view.descending)
    if view.search:
        rows = [r for r in rows if view.search in r.destination_id or view.search in r.tenant_id]
    pages = max(1, -(-len(rows) // PER_PAGE))
    page = min(view.page, pages)
    start = (page - 1) * PER_PAGE
    return Table(rows[start:start + PER_PAGE], len(rows), pages,
                 View(view.search, view.sort, view.descending, page),
                 snapshot.totals(view.search, rows),
                 time.monotonic() - snapshot.taken)


def _totals(rows: Sequence[Stats]) -> Totals:
    pending = retrying = waiting = 0
    oldest = delivered = failed = 0.0
    for r in rows:
        counts = r.counts
        pending += counts.pending
        retrying += counts.failed
        waiting += counts.waiting
        oldest = max(oldest, r.oldest_pending_seconds)
        delivered += r.delivered_per_second
        failed += r.failed_per_second
    return Totals(pending, retrying, waiting, oldest, delivered, failed)


@dataclass
class _Scope:
    snapshot: Snapshot | None = None
    refreshing: asyncio.Task[None] | None = None
    cost: float = 0.0
    seen: float = 0.0


class StatsCache:
    def __init__(self, ops: Operations, max_age: float) -> None:
        self._ops = ops
        self._max_age = max_age
        self._scopes: dict[int | None, _Scope] = {}

    async def snapshot(self, caller: Caller) -> Snapshot:
        """The caller's scope's figures: the last ones read, refreshed behind the answer when
        older than allowed; read now only when there are none yet."""
        now = time.monotonic()
        self._forget_unseen(now)
        scope = self._scopes.setdefault(caller.scope, _Scope())
        scope.seen = now
        if scope.snapshot is not None and scope.refreshing is None \
                and now - scope.snapshot.taken >= max(self._max_age, COST_FACTOR * scope.cost):
            scope.refreshing = asyncio.create_task(self._refresh(scope, caller))
        if scope.snapshot is None:
            if scope.refreshing is None:
                scope.refreshing = asyncio.create_task(self._refresh(scope, caller))
            await asyncio.shield(scope.refreshing)
        assert scope.snapshot is not None
        return scope.snapshot

    async def _refresh(self, scope: _Scope, caller: Caller) -> None:
        began = time.monotonic()
        try:
            response = await self._ops.stats.get(caller, admin_pb2.GetStatsRequest())
            scope.snapshot = Snapshot(response.destinations, time.monotonic())
            scope.cost = time.monotonic() - began
        except Exception:
            if scope.snapshot is None:
                raise  # the viewer waiting for it sees why
            log.warning("console: refreshing the overview's figures failed", exc_info=True)
        finally:
            scope.refreshing = None

    def invalidate(self) -> None:
        """After a change made from the console: the next view refreshes the figures (behind
        its answer, as always; the page it came from shows the change itself)."""
        for scope in self._scopes.values():
            if scope.snapshot is not None:
                scope.snapshot.taken = float("-inf")

    def _forget_unseen(self, now: float) -> None:
        for key in [k for k, s in self._scopes.items()
                    if now - s.seen > FORGET_SECONDS and s.refreshing is None]:
            del self._scopes[key]

    async def close(self) -> None:
        for scope in self._scopes.values():
            if scope.refreshing is not None:
                scope.refreshing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await scope.refreshing
