"""Where this router stands in the event log: per partition, and per destination in it.

Pure bookkeeping, no I/O (tests/test_tracks.py drives it without an event loop or a database).

The router reads each ordering partition it leases once, in event id order, for every
destination (the shared read: `position[p]` is how far it has read). A destination *follows*
that read in a partition: it is handed each event as it is read. A destination that cannot
keep up (its lane is full, it is paused, its circuit is open, or it dropped jobs it held and
must read them again) *lags*: it reads the partition on its own from its own `read_to`, and
follows again once it has caught up.

A job (event, destination) is *undecided* from the moment it is read until what became of it
is committed: delivered and recorded, written as a row (failed, aborted, parked behind its
user's), or never a job there (a filter kept it out, the destination is not connected). A
destination's *prefix* in a partition is how far everything is decided for it. What must
survive a crash is a lower bound of the prefixes: the partition's *frontier* (for every
destination without a cursor of its own) and a destination's own *cursor* (while it lags).
`plan()` says what to write; the frontier moves on past a lagging destination only in the
transaction that gives it its cursor.

Jobs decided above a prefix (delivered out of order by concurrent requests) are remembered
as *settled*, so that reading that range again (a lag read, or a new owner after a crash,
which loads them from Postgres) never delivers them twice.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Track:
    """One destination in one partition."""

    # How far it has been read for this destination while it lags; None: it follows the
    # shared read (read through position[p]).
    read_to: int | None = None
    # Events read and held in memory, not yet decided: a heap with lazy deletion.
    _heap: list[int] = field(default_factory=list)
    undecided: set[int] = field(default_factory=set)
    # Events above the prefix whose fate is committed; with a heap, so that trimming what the
    # prefix passed costs what it removes (rebuilding the set each time the prefix moved was
    # quadratic in a partition whose jobs are decided out of order).
    settled: set[int] = field(default_factory=set)
    _settled_heap: list[int] = field(default_factory=list)
    # Its cursor in Postgres (None: none; the frontier covers it).
    cursor: int | None = None

    @property
    def following(self) -> bool:
        return self.read_to is None

    def lowest_undecided(self) -> int | None:
        heap = self._heap
        while heap and heap[0] not in self.undecided:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def settle(self, event_ids: Iterable[int]) -> None:
        for event_id in event_ids:
            if event_id not in self.settled:
                self.settled.add(event_id)
                heapq.heappush(self._settled_heap, event_id)

    def trim_settled(self, prefix: int) -> None:
        """Forget the settled events at or below the prefix."""
        heap = self._settled_heap
        while heap and heap[0] <= prefix:
            self.settled.discard(heapq.heappop(heap))

    def add(self, event_id: int) -> None:
        if event_id not in self.undecided:
            self.undecided.add(event_id)
            heapq.heappush(self._heap, event_id)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to write to make the committed positions catch up with what is decided."""

    # partition -> new frontier (only ones that move)
    frontiers: dict[int, int]
    # (destination, partition) -> its cursor, or None to drop it
    cursors: dict[tuple[int, int], int | None]


class Positions:
    def __init__(self) -> None:
        # Partitions being read: how far the shared read has gone, and the committed frontier.
        self.position: dict[int, int] = {}
        self.frontier: dict[int, int] = {}
        self.tracks: dict[int, dict[int, Track]] = {}  # partition -> destination -> track
        # partition -> (event, destination) of undecided jobs of following destinations, a
        # heap with lazy deletion: the candidate is read at every read of the log, and
        # walking every track for it cost a sixth of the router's CPU at 10,000 destinations.
        self._following: dict[int, list[tuple[int, int]]] = {}
        # partition -> the events the shared read read there above the candidate, in order,
        # as (id, size), and their sizes' sum: what bounds the shared read in bytes (its
        # window proper is counted in ids, router_service.logread).
        self._ahead: dict[int, deque[tuple[int, int]]] = {}
        self._ahead_bytes: dict[int, int] = {}
        # partition -> which taking of it this is (a partition dropped and taken again is
        # read again from its frontier: what was read for the earlier taking is not its).
        self._taken: dict[int, int] = {}
        self._takings = itertools.count(1)
        # destination -> the partitions where it has a track: a lane asks where it lags at
        # every turn, and with thousands of destinations most have a track in few partitions.
        self._partitions_of: dict[int, set[int]] = {}

    # --- partitions ------------------------------------------------------------------------

    def take(self, partition: int, frontier: int, cursors: dict[int, int],
             settled: dict[int, set[int]]) -> None:
        """Start reading a partition (just leased) from its frontier; destinations with a
        cursor of their own lag from it; `settled` is what is decided above those."""
        self.position[partition] = frontier
        self.frontier[partition] = frontier
        tracks: dict[int, Track] = {}
        for destination, position in cursors.items():
            tracks[destination] = Track(read_to=position, cursor=position)
        for destination, events in settled.items():
            track = tracks.setdefault(destination, Track())
            track.settle(events)
        self.tracks[partition] = tracks
        self._following[partition] = []
        self._ahead[partition] = deque()
        self._ahead_bytes[partition] = 0
        self._taken[partition] = next(self._takings)
        for destination in tracks:
            self._partitions_of.setdefault(destination, set()).add(partition)

    def drop(self, partition: int) -> None:
        """The partition is no longer ours: forget it (what is in flight finishes unrecorded
        or fenced; the next owner reads it again from what is committed)."""
        self.position.pop(partition, None)
        self.frontier.pop(partition, None)
        self._following.pop(partition, None)
        self._ahead.pop(partition, None)
        self._ahead_bytes.pop(partition, None)
        self._taken.pop(partition, None)
        for destination in self.tracks.pop(partition, {}):
            self._untrack(destination, partition)

    def reading(self, partition: int) -> bool:
        return partition in self.position

    def taken(self, partition: int) -> int:
        """Which taking of the partition this is (it changes when it is taken again)."""
        return self._taken[partition]

    # --- reading ---------------------------------------------------------------------------

    def track(self, destination: int, partition: int) -> Track:
        tracks = self.tracks[partition]
        track = tracks.get(destination)
        if track is None:
            track = tracks[destination] = Track()
            self._partitions_of.setdefault(destination, set()).add(partition)
        return track

    def _untrack(self, destination: int, partition: int) -> None:
        partitions = self._partitions_of.get(destination)
        if partitions is not None:
            partitions.discard(partition)
            if not partitions:
                del self._partitions_of[destination]

    def follows(self, destination: int, partition: int) -> bool:
        track = self.tracks[partition].get(destination)
        return track is None or track.read_to is None

    def read_shared(self, partition: int, upto: int,
                    events: Iterable[tuple[int, int]] = ()) -> None:
        """The shared read has read the partition through `upto`, finding these events
        (id, size)."""
        if upto > self.position[partition]:
            self.position[partition] = upto
        ahead = self._ahead[partition]
        for event in events:
            ahead.append(event)
            self._ahead_bytes[partition] += event[1]

    def ahead(self, partition: int) -> tuple[int, int]:
        """The events (how many, and their size) the shared read holds in the partition
        above its candidate."""
        ahead = self._ahead[partition]
        candidate = self.candidate(partition)
        passed = 0
        while ahead and ahead[0][0] <= candidate:
            passed += ahead.popleft()[1]
        if passed:
            self._ahead_bytes[partition] -= passed
        return len(ahead), self._ahead_bytes[partition]

    def hands(self, destination: int, partition: int, event_id: int) -> bool:
        """Whether the shared read hands the destination this event: it follows the read
        there and has not settled the event already (`follows` and not `is_settled`, in one
        lookup: asked for every job read)."""
        track = self.tracks[partition].get(destination)
        return track is None or (track.read_to is None and event_id not in track.settled)

    def is_settled(self, destination: int, partition: int, event_id: int) -> bool:
        track = self.tracks[partition].get(destination)
        return track is not None and event_id in track.settled

    def held(self, destination: int, partition: int, event_id: int) -> None:
        """A job was handed to the destination's lane: undecided until recorded."""
        track = self.track(destination, partition)
        track.add(event_id)
        if track.read_to is None:
            heapq.heappush(self._following[partition], (event_id, destination))

    def is_held(self, destination: int, partition: int, event_id: int) -> bool:
        track = self.tracks[partition].get(destination)
        return track is not None and event_id in track.undecided

    def lag(self, destination: int, partition: int, before: int) -> None:
        """The destination stops following the shared read: it has been handed everything
        up to `before` and reads the rest on its own. (A lagging one stays where it is.)"""
        track = self.track(destination, partition)
        if track.read_to is None:
            track.read_to = min(before, self.position[partition])

    def read_own(self, destination: int, partition: int, after: int, upto: int) -> bool:
        """A read of its own covered the destination's share in (after, upto]; returns
        whether it now follows the shared read again (it has caught up with it). A track
        rewound below `after` meanwhile stays where it was rewound to."""
        track = self.track(destination, partition)
        if track.read_to is None:
            return True
        if track.read_to < after:
            return False
        track.read_to = max(track.read_to, upto)
        if track.read_to >= self.position[partition]:
            track.read_to = None
            following = self._following[partition]
            for event_id in track.undecided:
                heapq.heappush(following, (event_id, destination))
            return True
        return False

    def rewind(self, destination: int, partition: int, to: int) -> None:
        """The destination reads the partition on its own from `to` (a backfilled connection
        made after this router read past it, with the connections as they were before)."""
        track = self.track(destination, partition)
        if track.read_to is None or track.read_to > to:
            track.read_to = to

    def lagging_count(self) -> int:
        """Destination-partitions reading on their own."""
        return sum(t.read_to is not None for tracks in self.tracks.values()
                   for t in tracks.values())

    def lagging(self, destination: int) -> dict[int, int]:
        """Partition -> read_to, of the partitions the destination reads on its own."""
        tracks = self.tracks
        return {p: t.read_to for p in self._partitions_of.get(destination, ())
                if (t := tracks[p][destination]).read_to is not None}

    # --- deciding --------------------------------------------------------------------------

    def decided(self, destination: int, partition: int, event_id: int) -> None:
        """What became of the job is committed."""
        tracks = self.tracks.get(partition)
        if tracks is None:
            return
        track = tracks.get(destination)
        if track is None or event_id not in track.undecided:
            return
        lowest = track.lowest_undecided()
        track.undecided.discard(event_id)
        if event_id != lowest:
            # Above its lowest undecided job the prefix stays where it is: nothing to trim.
            track.settle((event_id,))
            return
        prefix = self._prefix(partition, track)
        if prefix < event_id:
            # Rewound below it (a job of its forgotten meanwhile): it is read again from
            # there, and must not be delivered again.
            track.settle((event_id,))
        self._trim(destination, partition, track, prefix)

    def forget(self, destination: int, partition: int, event_id: int) -> None:
        """A held job left memory undecided (dropped to be read again in Postgres's order,
        a park that found nothing to wait behind, a cancelled delivery): the destination
        reads the partition again from its prefix (what it still holds or has settled there
        is not handed to it twice)."""
        tracks = self.tracks.get(partition)
        if tracks is None:
            return
        track = tracks.get(destination)
        if track is None or event_id not in track.undecided:
            return
        track.undecided.discard(event_id)
        prefix = self._prefix(partition, track)
        rewound = min(prefix, event_id - 1)
        if track.read_to is None or rewound < track.read_to:
            track.read_to = rewound

    def prefix(self, destination: int, partition: int) -> int:
        track = self.tracks[partition].get(destination)
        if track is None:
            return self.position[partition]
        return self._prefix(partition, track)

    def _prefix(self, partition: int, track: Track) -> int:
        read = self.position[partition] if track.read_to is None else track.read_to
        lowest = track.lowest_undecided()
        return read if lowest is None else min(read, lowest - 1)

    def _trim(self, destination: int, partition: int, track: Track,
              prefix: int | None = None) -> None:
        """Forget settled events at or below the prefix, and a track with nothing to say."""
        track.trim_settled(self._prefix(partition, track) if prefix is None else prefix)
        if (not track.undecided and not track.settled and track.read_to is None
                and track.cursor is None):
            del self.tracks[partition][destination]
            self._untrack(destination, partition)

    # --- what holds the shared read back ---------------------------------------------------

    def candidate(self, partition: int) -> int:
        """How far the partition is decided for every destination following it: below the
        lowest undecided job of a following destination, and no further than read."""
        following = self._following[partition]
        tracks = self.tracks[partition]
        while following:
            event_id, destination = following[0]
            track = tracks.get(destination)
            if track is not None and track.read_to is None and event_id in track.undecided:
                return min(self.position[partition], event_id - 1)
            heapq.heappop(following)
        return self.position[partition]

    def holders(self, partition: int) -> list[int]:
        """The following destinations whose undecided jobs hold the candidate back."""
        low = self.candidate(partition)
        if low >= self.position[partition]:
            return []
        return [d for d, t in self.tracks[partition].items()
                if t.read_to is None and self._prefix(partition, t) == low]

    # --- what to write ---------------------------------------------------------------------

    def plan(self) -> Plan:
        """Frontiers and cursors that would make Postgres catch up with what is decided.

        A destination that lags gets (or keeps) a cursor at its prefix; the frontier moves to
        where every following destination is decided; a following destination's cursor is
        dropped once the frontier written is at or below its prefix (the frontier covers it
        again), and set to its prefix until then."""
        frontiers: dict[int, int] = {}
        cursors: dict[tuple[int, int], int | None] = {}
        for partition, tracks in self.tracks.items():
            old = self.frontier[partition]
            new = max(old, self.candidate(partition))
            if new > old:
                frontiers[partition] = new
            for destination, track in tracks.items():
                prefix = self._prefix(partition, track)
                if track.read_to is None and prefix >= new:
                    if track.cursor is not None:
                        cursors[destination, partition] = None
                elif track.cursor != prefix:
                    cursors[destination, partition] = prefix
        for partition, position in self.position.items():
            if not self.tracks[partition] and position > self.frontier[partition]:
                frontiers[partition] = position
        return Plan(frontiers, cursors)

    def written(self, plan: Plan, moved: Iterable[int]) -> None:
        """The plan is committed (for the partitions in `moved`: still owned)."""
        still = set(moved)
        for partition, frontier in plan.frontiers.items():
            if partition in still and partition in self.frontier:
                self.frontier[partition] = max(self.frontier[partition], frontier)
        for (destination, partition), cursor in plan.cursors.items():
            if partition not in still:
                continue
            track = self.tracks.get(partition, {}).get(destination)
            if track is None:
                continue
            track.cursor = cursor
            self._trim(destination, partition, track)
