"""The overview's figures: GetStats for the caller's scope, shared and kept for a moment, then
searched, sorted and paged in memory.

With 10,000 destinations every open console polling its own GetStats would be a query per
viewer every few seconds; instead one snapshot per scope (the operator's, or one tenant's) is
taken at most once per `max_age` seconds, whoever asks, and every viewer pages through it. A
page of 10,000 rows is sorted in milliseconds, and each ordering is kept with its snapshot.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from admin_service.ops import Operations
from relayq.auth import Caller
from relayq.v1 import admin_pb2

PER_PAGE = 50


@dataclass(frozen=True, slots=True)
class Row:
    destination_id: str
    tenant_id: str
    pending: int
    # Failed, due again later.
    retrying: int
    waiting: int
    oldest_pending_seconds: float
    delivered_per_second: float
    failed_per_second: float
    circuit_open: bool
    circuit_reason: str
    paused: bool


# Column name -> sort key; the first is the default order.
SORTS: dict[str, Any] = {
    "destination": lambda r: (r.destination_id, r.tenant_id),
    "tenant": lambda r: (r.tenant_id, r.destination_id),
    "pending": lambda r: r.pending,
    "retrying": lambda r: r.retrying,
    "waiting": lambda r: r.waiting,
    "oldest": lambda r: r.oldest_pending_seconds,
    "delivered": lambda r: r.delivered_per_second,
    "failed": lambda r: r.failed_per_second,
    "circuit": lambda r: (not r.circuit_open, r.destination_id),
    "paused": lambda r: (not r.paused, r.destination_id),
}


@dataclass
class Snapshot:
    rows: list[Row]
    taken: float
    _orders: dict[tuple[str, bool], list[Row]] = field(default_factory=dict)

    @classmethod
    def of(cls, response: admin_pb2.GetStatsResponse, taken: float) -> Snapshot:
        return cls([Row(d.destination_id, d.tenant_id, d.counts.pending, d.counts.failed,
                        d.counts.waiting, d.oldest_pending_seconds, d.delivered_per_second,
                        d.failed_per_second, d.circuit.open, d.circuit.reason, d.paused)
                    for d in response.destinations], taken)

    def ordered(self, sort: str, descending: bool) -> list[Row]:
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
        return cls(search=query.get("q", "").strip()[:200],
                   sort=sort if sort in SORTS else "destination",
                   descending=query.get("dir", "") == "desc", page=page)


@dataclass(frozen=True)
class Table:
    rows: list[Row]
    matched: int
    pages: int
    view: View
    totals: Row


def table(snapshot: Snapshot, view: View) -> Table:
    rows = snapshot.ordered(view.sort, view.descending)
    if view.search:
        needle = view.search.lower()
        rows = [r for r in rows if needle in r.destination_id or needle in r.tenant_id]
    pages = max(1, -(-len(rows) // PER_PAGE))
    page = min(view.page, pages)
    start = (page - 1) * PER_PAGE
    return Table(rows[start:start + PER_PAGE], len(rows), pages,
                 View(view.search, view.sort, view.descending, page), _totals(rows))


def _totals(rows: list[Row]) -> Row:
    return Row("", "", sum(r.pending for r in rows), sum(r.retrying for r in rows),
               sum(r.waiting for r in rows), max((r.oldest_pending_seconds for r in rows),
                                                 default=0.0),
               sum(r.delivered_per_second for r in rows),
               sum(r.failed_per_second for r in rows), sum(r.circuit_open for r in rows) > 0,
               "", False)


class StatsCache:
    def __init__(self, ops: Operations, max_age: float) -> None:
        self._ops = ops
        self._max_age = max_age
        self._snapshots: dict[int | None, Snapshot] = {}
        self._locks: dict[int | None, asyncio.Lock] = {}

    async def snapshot(self, caller: Caller) -> Snapshot:
        """The caller's scope's figures, at most `max_age` old; one read at a time per scope
        (callers arriving meanwhile wait for it rather than reading again)."""
        scope = caller.scope
        fresh = self._fresh(scope)
        if fresh is not None:
            return fresh
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            fresh = self._fresh(scope)
            if fresh is not None:
                return fresh
            response = await self._ops.stats.get(caller, admin_pb2.GetStatsRequest())
            snapshot = Snapshot.of(response, time.monotonic())
            self._forget_old()
            self._snapshots[scope] = snapshot
            return snapshot

    def invalidate(self) -> None:
        """After a change made from the console, its author sees it on the next read."""
        self._snapshots.clear()

    def _fresh(self, scope: int | None) -> Snapshot | None:
        snapshot = self._snapshots.get(scope)
        if snapshot is not None and time.monotonic() - snapshot.taken < self._max_age:
            return snapshot
        return None

    def _forget_old(self) -> None:
        now = time.monotonic()
        for scope in [s for s, snap in self._snapshots.items() if now - snap.taken > 60]:
            del self._snapshots[scope]
