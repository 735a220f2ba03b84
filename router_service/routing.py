"""Where the events of each source go: the router's view of the enabled connections.

Made whenever the router loads its configuration (router_service.engine), used for every
event it reads from the log: a source's routes in one dict lookup, each connection's filter
compiled once per filter text (a reload recompiles nothing that did not change).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from filterlang.errors import FilterError
from filterlang.events import EventFilter, compile_event_filter
from jobsdb.destinations import Connection

log = logging.getLogger(__name__)

_compile = functools.lru_cache(maxsize=4096)(compile_event_filter)


@dataclass(frozen=True, slots=True)
class Route:
    destination_key: int
    # The connection's number within its source: a job's id is (event_id << 16) | slot.
    slot: int
    # None: every event.
    filter: EventFilter | None
    # Events at or below this id are not taken from the log (a backfill wrote them as rows).
    after: int = 0


class Routing:
    def __init__(self, connections: Iterable[Connection] = ()) -> None:
        loaded = list(connections)
        routes: dict[int, list[Route]] = {}
        for c in loaded:
            routes.setdefault(c.source_key, []).append(
                Route(c.destination_key, c.slot, _compiled(c) if c.event_filter else None,
                      c.backfill_after))
        self._routes: dict[int, tuple[Route, ...]] = {s: tuple(r) for s, r in routes.items()}
        self.sources_of: dict[int, tuple[int, ...]] = {}
        for source, source_routes in self._routes.items():
            for route in source_routes:
                self.sources_of[route.destination_key] = (
                    *self.sources_of.get(route.destination_key, ()), source)
        self.by_pair: dict[tuple[int, int], Route] = {
            (s, r.destination_key): r for s, rs in self._routes.items() for r in rs}
        self._by_destination: dict[int, dict[int, Route]] = {
            s: {r.destination_key: r for r in rs} for s, rs in self._routes.items()}
        # Destinations whose backfill's rows are still being written: they take nothing from
        # the log meanwhile (they lag, and read their share once the rows are all there).
        self.holding: frozenset[int] = frozenset(
            c.destination_key for c in loaded if c.backfilling)

    def routes(self, source_key: int) -> tuple[Route, ...]:
        return self._routes.get(source_key, ())

    def routes_named(self, source_key: int, named: Iterable[int]) -> list[Route]:
        """The routes of a source to the destinations an event names: looked up one by
        one, since an event names a few destinations of a source that may have thousands."""
        routes = self._by_destination.get(source_key)
        if routes is None:
            return []
        return [route for key in named if (route := routes.get(key)) is not None]

    def any_filter(self, source_key: int) -> bool:
        return any(r.filter is not None for r in self.routes(source_key))


def document(text: str) -> Mapping[str, Any]:
    """An event document as filters read it (parsed once per event, only when a filter
    needs it). Ingest accepts JSON that orjson refuses (numbers beyond a double's range):
    the standard library reads those (as ingest's validation did). A document neither can
    read (nothing ingest accepts) reads as empty: a filter over it is unknown, so it does not
    match, and the other events of the read go on."""
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            log.error("an event document that is not JSON; no connection filter takes it")
            return {}
    return parsed if isinstance(parsed, dict) else {}


def _compiled(connection: Connection) -> EventFilter | None:
    """A stored filter, compiled. The admin service stores only filters that compile, so one
    that does not was written by another version of relayq: it matches no event (a
    subscription must never widen by itself), and every load says so."""
    assert connection.event_filter is not None
    try:
        return _compile(connection.event_filter)
    except FilterError as exc:
        log.error("connection filter does not compile; the connection gets no events",
                  extra={"source_key": connection.source_key,
                         "destination_key": connection.destination_key,
                         "error": exc.message})
        return EventFilter(connection.event_filter, lambda event: False)
