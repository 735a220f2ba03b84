"""router_service.fanout and the shared read's stall rule (router_service.logread): who is
made to lag, and when. Pure: real Positions, Routing and FanOut, lanes reduced to what these
look at, no database (the LogReader's pool is never used).

Lagging costs one read of the log per lagging destination, so it is worth it only when
another destination gains: a full lane alone is no reason (the window bounds memory), and
holders that are every destination routed gain nothing from lagging each other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from jobsdb.destinations import Connection
from jobsdb.eventlog import LoggedEvent
from router_service.fanout import FanOut
from router_service.logread import STALL_SECONDS, LogReader
from router_service.routing import Routing
from router_service.tracks import Positions

SOURCE = 1


class _Lane:
    """What fan-out and the stall rule read of a lane: its room, whether it takes logged jobs;
    and what it was handed."""

    def __init__(self, room: int = 10) -> None:
        self.room = room
        self.takes_logged = True
        self.wake = SimpleNamespace(set=lambda: None)
        self.handed: list[int] = []

    def admit_logged(self, jobs: list[tuple[Any, int | None]]) -> None:
        self.handed += [job.event_id for job, _ in jobs]
        self.room -= len(jobs)


def _connection(destination: int, slot: int) -> Connection:
    return Connection(SOURCE, destination, slot, event_filter=None)


def _world(*destinations: int, room: int = 10) -> tuple[Positions, FanOut, dict[int, _Lane]]:
    positions = Positions()
    positions.take(0, 0, {}, {})
    lanes = {key: _Lane(room) for key in destinations}
    routing = Routing([_connection(key, n) for n, key in enumerate(destinations)])
    cursors: Any = SimpleNamespace(filtered={}, changed=lambda: None)
    fan_out = FanOut(positions=positions, cursors=cursors, blocked={},
                     routing=lambda: routing, destinations=dict, lanes=lambda: lanes,
                     lane=lanes.get)
    return positions, fan_out, lanes


def _event(event_id: int, *named: int) -> LoggedEvent:
    return LoggedEvent(event_id=event_id, partition=0, source_key=SOURCE, tenant_key=1,
                       created_at=datetime.now(UTC), user_id=f"u{event_id}",
                       message_id=f"m{event_id}", destinations=list(named) or None,
                       document="{}", traceparent=None)


def _reader(positions: Positions, fan_out: FanOut) -> LogReader:
    pool: Any = None
    return LogReader(pool, positions, batch=10, window=10, window_bytes=1 << 20,
                     poll_seconds=1.0,
                     usable=lambda: {0}, fan_out=fan_out, on_stalled=fan_out.stalled,
                     full=fan_out.full, ensure_config=lambda version: _nothing())


async def _nothing() -> None:
    return None


def test_a_full_lane_is_handed_its_events_and_keeps_following() -> None:
    positions, fan_out, lanes = _world(7, room=2)
    positions.read_shared(0, 5)
    fan_out([_event(n) for n in range(1, 6)])
    assert lanes[7].handed == [1, 2, 3, 4, 5]
    assert positions.follows(7, 0)


def test_an_event_naming_destinations_goes_to_those_only() -> None:
    positions, fan_out, lanes = _world(7, 8, 9)
    positions.read_shared(0, 2)
    fan_out([_event(1, 8), _event(2, 7, 9)])
    assert (lanes[7].handed, lanes[8].handed, lanes[9].handed) == ([2], [1], [2])


def test_a_paused_destination_lags_from_the_event_it_could_not_take() -> None:
    positions, fan_out, lanes = _world(7, 8)
    lanes[7].takes_logged = False
    positions.read_shared(0, 3)
    fan_out([_event(1), _event(2), _event(3)])
    assert not positions.follows(7, 0)
    assert positions.lagging(7) == {0: 0}
    assert lanes[8].handed == [1, 2, 3]


def test_holders_with_full_lanes_lag_at_once_when_another_destination_waits() -> None:
    positions, fan_out, _ = _world(7, 8, room=1)
    positions.read_shared(0, 10)
    fan_out([_event(1, 7)])  # 7 holds the window and its lane is full
    reader = _reader(positions, fan_out)
    reader._stalled(0, positions.candidate(0), now=0.0)
    assert not positions.follows(7, 0)


def test_holders_with_room_lag_only_after_the_stall_lasted() -> None:
    positions, fan_out, _ = _world(7, 8, room=100)
    positions.read_shared(0, 10)
    fan_out([_event(1, 7)])
    reader = _reader(positions, fan_out)
    reader._stalled(0, positions.candidate(0), now=0.0)
    assert positions.follows(7, 0)
    reader._stalled(0, positions.candidate(0), now=STALL_SECONDS)
    assert not positions.follows(7, 0)


def test_holders_that_are_every_destination_routed_keep_following() -> None:
    """At fan-out to all, every destination holds the window: lagging them all would only
    turn one shared read into one read per destination."""
    positions, fan_out, _ = _world(7, 8, room=1)
    positions.read_shared(0, 10)
    fan_out([_event(1)])
    reader = _reader(positions, fan_out)
    reader._stalled(0, positions.candidate(0), now=0.0)
    reader._stalled(0, positions.candidate(0), now=10 * STALL_SECONDS)
    assert positions.follows(7, 0)
    assert positions.follows(8, 0)
    assert not reader._wake.is_set()  # nothing changed: the reader does not spin
