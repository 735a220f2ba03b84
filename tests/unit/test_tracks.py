"""router_service.tracks: where a router stands in the event log. Pure, no I/O.

The property that matters: what `plan()` says to write never claims a job decided that is
not (no event is ever skipped), whatever order jobs are held, decided, forgotten and
destinations made to lag in; and once everything is decided, it catches up completely.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.tracks import Plan, Positions


def _take(frontier: int = 0, cursors: dict[int, int] | None = None,
          settled: dict[int, set[int]] | None = None) -> Positions:
    positions = Positions()
    positions.take(0, frontier, cursors or {}, settled or {})
    return positions


def _write(positions: Positions) -> Plan:
    plan = positions.plan()
    positions.written(plan, {0})
    return plan


def test_a_partition_with_nothing_held_moves_its_frontier_to_what_was_read() -> None:
    positions = _take(frontier=10)
    positions.read_shared(0, 25)
    assert _write(positions) == Plan({0: 25}, {})
    assert positions.frontier[0] == 25
    assert _write(positions) == Plan({}, {})  # nothing more to say


def test_the_frontier_stops_below_the_lowest_undecided_job() -> None:
    positions = _take()
    positions.read_shared(0, 10)
    for event, destination in ((3, 1), (5, 2), (7, 1)):
        positions.held(destination, 0, event)
    assert _write(positions).frontiers == {0: 2}
    positions.decided(1, 0, 3)
    assert _write(positions).frontiers == {0: 4}
    positions.decided(2, 0, 5)  # 7 of destination 1 still out
    assert _write(positions).frontiers == {0: 6}
    positions.decided(1, 0, 7)
    assert _write(positions).frontiers == {0: 10}
    assert positions.tracks[0] == {}  # nothing left to remember


def test_a_destination_that_lags_gets_a_cursor_and_the_frontier_moves_past_it() -> None:
    positions = _take()
    positions.read_shared(0, 10)
    positions.held(1, 0, 4)
    positions.lag(1, 0, 10)  # its lane was full from event 11 on
    positions.read_shared(0, 20)
    plan = _write(positions)
    assert plan == Plan({0: 20}, {(1, 0): 3})  # both in one transaction
    positions.decided(1, 0, 4)
    assert _write(positions) == Plan({}, {(1, 0): 10})
    # It reads its share on its own and catches up: the frontier covers it again.
    assert positions.read_own(1, 0, 10, 20)
    assert _write(positions) == Plan({}, {(1, 0): None})
    assert positions.tracks[0] == {}


def test_forgetting_a_held_job_makes_its_destination_read_again_from_its_prefix() -> None:
    positions = _take()
    positions.read_shared(0, 10)
    for event in (2, 4, 6):
        positions.held(1, 0, event)
    positions.decided(1, 0, 6)  # delivered out of order: settled above the prefix
    positions.forget(1, 0, 4)  # dropped from memory undecided
    assert positions.lagging(1) == {0: 1}
    assert positions.is_settled(1, 0, 6)
    assert positions.is_held(1, 0, 2)
    # A read of its own that raced the rewind does not skip what was rewound.
    assert not positions.read_own(1, 0, 5, 10)
    assert positions.lagging(1) == {0: 1}
    # Its lowest job decided now is above where it reads again from: remembered as settled,
    # so that reading again does not deliver it twice.
    positions.decided(1, 0, 2)
    assert positions.prefix(1, 0) == 1
    assert positions.is_settled(1, 0, 2)


def test_a_new_owner_starts_from_the_frontier_and_the_cursors_and_skips_what_is_settled() -> None:
    positions = _take(frontier=100, cursors={7: 40}, settled={3: {105}})
    assert positions.lagging(7) == {0: 40}
    assert positions.follows(3, 0)
    assert positions.is_settled(3, 0, 105)
    positions.read_shared(0, 110)
    assert _write(positions) == Plan({0: 110}, {})
    assert positions.tracks[0][7].cursor == 40


def test_stalled_holders_are_the_destinations_at_the_candidate() -> None:
    positions = _take()
    positions.read_shared(0, 50)
    positions.held(1, 0, 5)
    positions.held(2, 0, 30)
    assert positions.candidate(0) == 4
    assert positions.holders(0) == [1]
    positions.lag(1, 0, 50)
    assert positions.candidate(0) == 29
    assert positions.holders(0) == [2]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_what_is_written_never_passes_an_undecided_job(data: st.DataObject) -> None:
    """Random reads, holds, decisions, forgets, lags and own reads: every committed position
    (frontier for following destinations, cursor for the others) stays below every job not
    yet decided; when all is decided and read, every destination is at the end."""
    positions = _take()
    destinations = (1, 2, 3)
    undecided: dict[int, set[int]] = {d: set() for d in destinations}
    decided: dict[int, set[int]] = {d: set() for d in destinations}
    written = {"frontier": 0, "cursors": {}}  # what Postgres has
    end = 0
    for _ in range(data.draw(st.integers(5, 60))):
        action = data.draw(st.sampled_from(["read", "decide", "forget", "lag", "own",
                                            "write"]))
        if action == "read":
            new = end + data.draw(st.integers(1, 5))
            for event in range(end + 1, new + 1):
                for d in destinations:
                    if positions.follows(d, 0) and data.draw(st.booleans()):
                        positions.held(d, 0, event)
                        undecided[d].add(event)
            positions.read_shared(0, new)
            end = new
        elif action in ("decide", "forget"):
            held = [(d, e) for d in destinations for e in undecided[d]]
            if held:
                d, e = data.draw(st.sampled_from(sorted(held)))
                undecided[d].discard(e)
                if action == "decide":
                    positions.decided(d, 0, e)
                    decided[d].add(e)
                else:
                    positions.forget(d, 0, e)
                    positions.held(d, 0, e)  # read again at once (as a read of its own)
                    undecided[d].add(e)
        elif action == "lag":
            d = data.draw(st.sampled_from(destinations))
            positions.lag(d, 0, end)
        elif action == "own":
            d = data.draw(st.sampled_from(destinations))
            lagging = positions.lagging(d)
            if lagging:
                positions.read_own(d, 0, lagging[0], end)
        # The candidate (kept as a heap) is what walking every following track says.
        walked = min([positions.position[0]] + [
            positions.prefix(d, 0) for d, t in positions.tracks[0].items()
            if t.read_to is None])
        assert positions.candidate(0) == walked
        plan = positions.plan()
        positions.written(plan, {0})
        written["frontier"] = positions.frontier[0]
        cursors = written["cursors"]
        assert isinstance(cursors, dict)
        for (d, _), cursor in plan.cursors.items():
            if cursor is None:
                cursors.pop(d, None)
            else:
                cursors[d] = cursor
        for d in destinations:
            committed = cursors.get(d, written["frontier"])
            assert all(e > committed for e in undecided[d]), (d, committed, undecided[d])
            # Nothing decided is handed out again: it is below where the destination reads
            # from, or remembered as settled.
            prefix = positions.prefix(d, 0)
            assert all(e <= prefix or positions.is_settled(d, 0, e) for e in decided[d]), (
                d, prefix, decided[d])
    for d in destinations:
        for e in sorted(undecided[d]):
            positions.decided(d, 0, e)
        lagging = positions.lagging(d)
        if lagging:
            positions.read_own(d, 0, lagging[0], end)
    plan = positions.plan()
    positions.written(plan, {0})
    assert positions.frontier[0] == end
    assert positions.tracks[0] == {}


def test_what_is_read_ahead_is_the_events_above_the_candidate_and_their_bytes() -> None:
    """What bounds the shared read in bytes: the events it read that a following
    destination has not decided, counted down as the candidate passes them."""
    positions = _take()
    positions.read_shared(0, 1000, [(10, 100), (500, 100), (900, 50)])
    positions.held(7, 0, 10)
    positions.held(7, 0, 500)
    assert positions.ahead(0) == (3, 250)
    positions.decided(7, 0, 10)
    assert positions.ahead(0) == (2, 150)
    positions.decided(7, 0, 500)
    assert positions.ahead(0) == (0, 0)
