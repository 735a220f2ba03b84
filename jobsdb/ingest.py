"""The write path: de-duplicate, fan out one job per destination, wake the routers.

The caller commits; nothing here is acknowledged until it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from psycopg import AsyncConnection

from jobsdb import locks
from jobsdb.keyspace import partition_of
from jobsdb.sqlfile import query

# A NOTIFY payload must stay under 8000 bytes.
_NOTIFY_LIMIT = 7000
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
    # One job per destination, in this order.
    destination_keys: tuple[int, ...]
    # Connected destinations whose filter refused the event: counted per connection
    # (connection_counts) if the event is stored, not if it is a duplicate.
    filtered_keys: tuple[int, ...] = ()


@dataclass(slots=True)
class Stored:
    duplicate: bool
    job_ids: list[int] = field(default_factory=list)


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

    # Each event's destinations and their ordering partitions, ';'-joined. Events of one
    # source share a tuple of destinations, so its text is made once per flush.
    destination_texts: dict[tuple[int, ...], str] = {}
    destinations: list[str] = []
    partitions: list[str] = []
    # Events that filters kept from some destinations, each with the index (1-based) of its
    # set of such destinations: events of one kind share a set, so a flush sends a few sets
    # and one number per event, not a pair per event and destination.
    filtered_events: list[str] = []
    filtered_sets: list[str] = []
    sets: dict[tuple[int, ...], str] = {}
    for position, (event, _) in enumerate(unique, start=1):
        keys = event.destination_keys
        text = destination_texts.get(keys)
        if text is None:
            text = destination_texts[keys] = ";".join(map(str, keys))
        destinations.append(text)
        user = event.user_id
        if len(keys) == 1:
            partitions.append(str(partition_of(keys[0], user, ordering_partitions)))
        else:
            partitions.append(";".join(
                str(partition_of(key, user, ordering_partitions)) for key in keys))
        if event.filtered_keys:
            index = sets.get(event.filtered_keys)
            if index is None:
                index = sets[event.filtered_keys] = str(len(sets) + 1)
            filtered_events.append(str(position))
            filtered_sets.append(index)
    notify = ",".join(map(str, sorted({d for keys in destination_texts for d in keys})))
    params = {
        "message_ids": _joined([e.message_id for e, _ in unique]),
        "source_keys": ",".join([str(e.source_key) for e, _ in unique]),
        "tenant_keys": ",".join([str(e.tenant_key) for e, _ in unique]),
        "user_ids": _joined([e.user_id for e, _ in unique]),
        "documents": _joined([e.document for e, _ in unique]),
        "destinations": ",".join(destinations),
        "partitions": ",".join(partitions),
        "filtered_events": ",".join(filtered_events),
        "filtered_sets": ",".join(filtered_sets),
        "sets": "|".join(";".join(map(str, keys)) for keys in sets),
        "notify": notify if len(notify) <= _NOTIFY_LIMIT else "*",
    }
    await conn.execute(query("ingest.sql", "lock_generations"), {"lock": locks.DEDUP_GENERATIONS})
    cur = await conn.execute(query("ingest.sql", "store_events"), params)
    row = await cur.fetchone()
    assert row is not None
    duplicates, job_ids = row[0], row[1]

    for position in duplicates.split(",") if duplicates else ():
        unique[int(position) - 1][1].duplicate = True
    ids = list(map(int, job_ids.split(","))) if job_ids else []
    taken = 0
    for event, stored in unique:
        if not stored.duplicate:
            count = len(event.destination_keys)
            stored.job_ids = ids[taken:taken + count]
            taken += count
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
