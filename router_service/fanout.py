"""Handing out what the shared read of the log found, and keeping the destinations that fall
behind reading on their own.

The shared read (router_service.logread) reads each partition this router leases once for
every destination; `FanOut` gives each event to the destinations that take it, in id order,
through their lanes. A destination that cannot take jobs now (no lane, paused, held by a
backfill) lags: it stops following the shared read and reads its share itself later
(Lane._read_own). A lane that holds many jobs does not lag for that alone: what the shared
read holds in memory is bounded by its window per partition already, and lagging whenever a
lane filled turned a backlog into one read of the log per destination (at fan-out 10, each
destination's share of a backlog's first read, 500 events in each of 64 partitions, is 32,000
jobs, against a lane of 2,000).
A destination too slow for the others is found by the window instead: `stalled` makes the
destinations that hold a partition's window full lag (at once when their lanes are full,
after a while otherwise), unless they are all the destinations there are: then the others
gain nothing, and each would read the log on its own for nothing.
`lag_readers` makes sure each lagging destination has a lane to do that reading, and
`backfills_changed` rewinds a destination whose connection was backfilled after this router
read past the backfill's end (jobsdb.replays).

It owns nothing: the engine hands it its collaborators (positions, cursors, who waits behind
which row, the connections as loaded, the lanes), so what it decides is all in this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from jobsdb.catalog import Destination
from jobsdb.eventlog import LoggedEvent
from router_service import metrics
from router_service.lane import Lane
from router_service.logread import CursorWriter
from router_service.model import Job
from router_service.routing import Routing, document
from router_service.tracks import Positions

log = logging.getLogger(__name__)


class FanOut:
    def __init__(self, *, positions: Positions, cursors: CursorWriter,
                 blocked: dict[tuple[int, str], int], routing: Callable[[], Routing],
                 destinations: Callable[[], dict[int, Destination]],
                 lanes: Callable[[], dict[int, Lane]],
                 lane: Callable[[int], Lane | None]) -> None:
        self._positions = positions
        self._cursors = cursors
        self._blocked = blocked
        self._routing = routing
        self._destinations = destinations
        self._lanes = lanes
        # The lane of a destination, made when it has none yet (None: it cannot have one).
        self._lane = lane

    def __call__(self, events: list[LoggedEvent]) -> None:
        """Events the shared read found, in id order per partition: a job for each
        destination that follows its partition and takes it (its source is connected to it,
        the event names it or no destination, the connection's filter matches), handed to
        that destination's lane. A destination that cannot take jobs now (no lane, paused)
        lags from this event on and reads its share itself later."""
        positions = self._positions
        routing = self._routing()
        blocked = self._blocked
        handed: dict[int, list[tuple[Job, int | None]]] = {}
        takes: dict[int, bool] = {}
        filtered = self._cursors.filtered
        for event in events:
            named = event.destinations
            routes = (routing.routes(event.source_key) if named is None
                      else routing.routes_named(event.source_key, named))
            if not routes:
                continue
            partition = event.partition
            event_id = event.event_id
            parsed = None
            for route in routes:
                key = route.destination_key
                if event_id <= route.after:
                    continue  # a backfill's: written as a row
                if not positions.hands(key, partition, event_id):
                    continue
                if route.filter is not None:
                    if parsed is None:
                        parsed = document(event.document)
                    if route.filter.evaluate(parsed) is not True:
                        filtered[event.source_key, key] += 1
                        if (kept := self._destinations().get(key)) is not None:
                            metrics.FILTERED.labels(kept.id).inc()
                        continue
                taking = takes.get(key)
                if taking is None:
                    lane = self._lane(key)
                    taking = takes[key] = lane is not None and lane.takes_logged
                if not taking:
                    positions.lag(key, partition, event_id - 1)
                    continue
                positions.held(key, partition, event_id)
                jobs = handed.get(key)
                if jobs is None:
                    jobs = handed[key] = []
                jobs.append((Job.from_event(event, route.slot), blocked.get((key, event.user_id))))
        lanes = self._lanes()
        for key, jobs in handed.items():
            lanes[key].admit_logged(jobs)
        self._cursors.changed()

    def full(self, holders: list[int]) -> bool:
        """Whether every one of these destinations' lanes is full: they hold the window and
        cannot take more, so waiting for them to move it would only delay the others."""
        lanes = self._lanes()
        return all((lane := lanes.get(key)) is None or lane.room <= 0 for key in holders)

    def stalled(self, partition: int, holders: list[int]) -> bool:
        """These destinations have held a partition's window full for a while: they lag
        from here (reading their share themselves), so the others' events flow; unless no
        other destination is routed, so none would flow. Returns whether they lag."""
        if set(holders).issuperset(self._routing().sources_of):
            return False
        lanes = self._lanes()
        for key in holders:
            self._positions.lag(key, partition, self._positions.position[partition])
            lane = lanes.get(key)
            if lane is not None:
                lane.wake.set()
        log.info("destinations lag in a partition of the log", extra={
            "partition": partition, "destinations": holders})
        self._cursors.changed()
        return True

    def lag_readers(self) -> None:
        """A lane for every destination that reads a partition on its own (a cursor of its
        own, taken over with the partition): nothing else would make one, since the shared
        read passes such destinations by."""
        lanes = self._lanes()
        for tracks in self._positions.tracks.values():
            for key, track in tracks.items():
                if track.read_to is not None and key not in lanes:
                    lane = self._lane(key)
                    if lane is not None:
                        lane.wake.set()

    def backfills_changed(self, old: Routing, released: dict[tuple[int, str], int]) -> None:
        """A connection backfilled since the last load takes the log from its backfill's end
        on: where this router has read past that (with the connections as they were), the
        destination reads its share on its own from there. A backfill whose rows are all
        written lets its destination read: who waits behind its rows is known first."""
        positions = self._positions
        routing = self._routing()
        for pair, route in routing.by_pair.items():
            before = old.by_pair.get(pair)
            if not route.after or (before is not None and before.after == route.after):
                continue
            for partition, position in positions.position.items():
                if position > route.after:
                    positions.rewind(route.destination_key, partition, route.after)
        self._blocked.update(released)
        lanes = self._lanes()
        for key in old.holding - routing.holding:
            if (lane := lanes.get(key)) is not None:
                lane.wake.set()
        self.lag_readers()
        self._cursors.changed()
