"""The write-key lookup on the ingest path: which source a key belongs to, and where that
source's events go."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from filterlang.errors import FilterError
from filterlang.events import EventFilter, compile_event_filter
from jobsdb.keys import hash_secret
from jobsdb.sqlfile import query

log = logging.getLogger(__name__)

# Routes are reloaded every few seconds (and on every configuration change); a filter's text
# is compiled once per process, not on every reload.
_compile = functools.lru_cache(maxsize=4096)(compile_event_filter)


@dataclass(frozen=True, slots=True)
class SourceRoute:
    source_key: int
    source_id: str
    tenant_key: int
    tenant_id: str
    enabled: bool
    # Events per second ingest takes from the source (0: unlimited), and the burst.
    rate_per_second: float
    rate_burst: int
    # Connected destinations, in destination_key order: public id -> key.
    destinations: dict[str, int]
    # The same keys, in the same order: every event without named destinations goes to all
    # (that its connection's filter lets through).
    destination_keys: tuple[int, ...]
    # The connections that have a filter: destination key -> the filter, compiled once here,
    # when the route is loaded (so once per configuration change), never per event.
    filters: dict[int, EventFilter] = field(default_factory=dict)


async def source_for_write_key(conn: AsyncConnection[Any], write_key: str) -> SourceRoute | None:
    """The source a write key belongs to, or None if the key is unknown, revoked or expired."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query("write_keys.sql", "source_for_write_key"),
                      {"key_hash": hash_secret(write_key)})
    row = await cur.fetchone()
    if row is None:
        return None
    keys, ids = row.pop("destination_keys"), row.pop("destination_ids")
    texts = row.pop("destination_filters")
    filters: dict[int, EventFilter] = {}
    for key, destination_id, text in zip(keys, ids, texts, strict=True):
        compiled = _compiled(row["source_id"], destination_id, text) if text else None
        if compiled is not None:
            filters[key] = compiled
    return SourceRoute(**row, destinations=dict(zip(ids, keys, strict=True)),
                       destination_keys=tuple(keys), filters=filters)


def _compiled(source_id: str, destination_id: str, text: str) -> EventFilter | None:
    """A stored filter, compiled. The admin service stores only filters that compile, so one
    that does not was written by another version of relayq: it matches no event (a
    subscription must never widen by itself), and every route load says so."""
    try:
        compiled = _compile(text)
    except FilterError as exc:
        log.error("connection filter does not compile; the connection gets no events",
                  extra={"source": source_id, "destination": destination_id,
                         "error": exc.message})
        return EventFilter(text, lambda event: False)
    return compiled
