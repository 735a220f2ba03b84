"""The write path: de-duplicate, write each new event to the log once, wake the routers.

The caller commits; nothing here is acknowledged until it does. What an event becomes at each
destination (its connections, their filters, the destinations it names) is decided by the
routers when they read it, so this costs the same whatever is connected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import class_row

from jobsdb import locks
from jobsdb.keyspace import partition_of
from jobsdb.sqlfile import query

# Text travels to Postgres joined by this: valid JSON never contains it, ingest refuses it in ids.
_SEPARATOR = "\x1f"


class NewEvent(NamedTuple):
    """One validated event. A NamedTuple, not a dataclass: ingest makes one per event and a
    frozen dataclass costs four times as much to build."""

    source_key: int
    tenant_key: int
    message_id: str
    # The ordering key's user part.
    user_id: str
    # The event document (JSON object text) exactly as it will be delivered.
    document: str
    # The connected destinations the producer named; None: every connection of the source.
    destinations: tuple[int, ...] | None = None
    # The sender's W3C traceparent, checked by ingest (None: sent without one).
    traceparent: str | None = None


@dataclass(slots=True)
class Stored:
    duplicate: bool
    # The event's id in the log (None for a duplicate).
    event_id: int | None = None


class _StoredBatch(NamedTuple):
    """What store_events answers (sql/ingest.sql): positions and ids, comma-joined."""

    duplicates: str
    event_ids: str
    notified: object  # pg_notify's void


async def store_events(
    conn: AsyncConnection[Any], events: Sequence[NewEvent], *, ordering_partitions: int
) -> list[Stored]:
    """Store events that were not seen before; report each one's fate, in input order.

    Two statements: run it inside `conn.pipeline()` and a transaction, and a flush costs two
    round trips (this one, then COMMIT). Two events in `events` with the same
    (source, message_id): the first wins, the rest are duplicates, as if they had come in
    separate transactions.
    """
    if not events:
        return []
    results: list[Stored] = []
    unique: list[tuple[NewEvent, Stored]] = []
    seen: set[tuple[int, str]] = set()
    for event in events:
        key = (event.source_key, event.message_id)
        stored = Stored(duplicate=key in seen)
        results.append(stored)
        if not stored.duplicate:
            seen.add(key)
            unique.append((event, stored))

    # A user's partition is asked for once per flush, however many of their events it holds.
    partition_texts: dict[str, str] = {}
    partitions: list[str] = []
    named: list[str] = []
    traced = False
    for event, _ in unique:
        user = event.user_id
        text = partition_texts.get(user)
        if text is None:
            text = partition_texts[user] = str(partition_of(user, ordering_partitions))
        partitions.append(text)
        named.append(";".join(map(str, event.destinations)) if event.destinations else "")
        traced = traced or event.traceparent is not None
    params = {
        "message_ids": _joined([e.message_id for e, _ in unique]),
        "source_keys": ",".join([str(e.source_key) for e, _ in unique]),
        "tenant_keys": ",".join([str(e.tenant_key) for e, _ in unique]),
        "partitions": ",".join(partitions),
        "user_ids": _joined([e.user_id for e, _ in unique]),
        "documents": _joined([e.document for e, _ in unique]),
        "destinations": ",".join(named),
        # '' when no event has one: an empty array, which unnest pads with NULLs for free.
        "traceparents": ",".join([e.traceparent or "" for e, _ in unique]) if traced else "",
        "notify": ",".join(sorted(set(partition_texts.values()), key=int)),
    }
    await conn.execute(query("ingest.sql", "lock_generations"), {"lock": locks.DEDUP_GENERATIONS})
    cur = conn.cursor(row_factory=class_row(_StoredBatch))
    await cur.execute(query("ingest.sql", "store_events"), params)
    row = await cur.fetchone()
    assert row is not None
    duplicates, event_ids = row.duplicates, row.event_ids

    for position in duplicates.split(",") if duplicates else ():
        unique[int(position) - 1][1].duplicate = True
    ids = iter(map(int, event_ids.split(","))) if event_ids else iter(())
    for _, stored in unique:
        if not stored.duplicate:
            stored.event_id = next(ids)
    return results


async def unstorable(conn: AsyncConnection[Any], documents: Sequence[str]) -> dict[int, str]:
    """The documents Postgres refuses as jsonb, by position, with its reason; {} if none.

    Bisects, each half in a savepoint of the caller's transaction, so k refused documents
    among n cost about 2k log2(n) statements, and the innocent ones are parsed, never stored.
    """
    refused: dict[int, str] = {}

    async def probe(low: int, high: int) -> None:
        try:
            async with conn.transaction():
                await conn.execute(query("ingest.sql", "parse_documents"),
                                   {"documents": _joined(list(documents[low:high]))})
        except psycopg.errors.DataError as exc:
            if high - low == 1:
                refused[low] = exc.diag.message_primary or type(exc).__name__
                return
            middle = (low + high) // 2
            await probe(low, middle)
            await probe(middle, high)

    if documents:
        await probe(0, len(documents))
    return refused


def _joined(values: list[str]) -> str:
    """Values joined by the unit separator, refusing any that contains it."""
    text = _SEPARATOR.join(values)
    if text.count(_SEPARATOR) != len(values) - 1:
        raise ValueError("a value contains the \\x1f separator")
    return text
