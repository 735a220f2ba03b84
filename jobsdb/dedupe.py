"""Rotation of message-id de-duplication generations (see the schema for the design).

A generation lasts a quarter of the window. A generation is dropped once the generation after
it is older than the window: every key in it was then claimed more than a window ago. So a
key is remembered for at least the window and at most 1.25 windows.
"""

from __future__ import annotations

import itertools
import logging
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row

from jobsdb import locks
from jobsdb.sqlfile import query

log = logging.getLogger(__name__)


class Generation(NamedTuple):
    generation: int
    started_at: datetime
    age: timedelta


async def _generations(conn: AsyncConnection[Any]) -> list[Generation]:
    cur = conn.cursor(row_factory=class_row(Generation))
    await cur.execute(query("dedupe.sql", "generations"))
    return await cur.fetchall()


async def rotate(conn: AsyncConnection[Any], *, window: timedelta) -> bool:
    """Start a new generation if the current one is old enough, and drop expired ones.

    Runs its own transaction on `conn`. Returns whether anything changed.
    """
    slice_length = window / 4
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        rows = await _generations(conn)
        if not rows or rows[-1].age < slice_length:
            return False
        await conn.execute(query("dedupe.sql", "lock_rotation"), {"lock": locks.DEDUP_GENERATIONS})
        rows = await _generations(conn)
        if rows[-1].age < slice_length:
            return False  # another process rotated while we waited
        current = rows[-1].generation
        await conn.execute(
            sql.SQL("CREATE TABLE {name} PARTITION OF dedup_keys FOR VALUES IN ({value})").format(
                name=sql.Identifier(f"dedup_keys_g{current + 1}"),
                value=sql.Literal(current + 1),
            )
        )
        await conn.execute(query("dedupe.sql", "add_generation"), {"generation": current + 1})
        # rows[i + 1] is the generation after rows[i]; the new one is younger than any.
        for older, newer in itertools.pairwise(rows):
            generation = older.generation
            if newer.age > window:
                await conn.execute(
                    sql.SQL("DROP TABLE {name}").format(
                        name=sql.Identifier(f"dedup_keys_g{generation}")
                    )
                )
                await conn.execute(
                    query("dedupe.sql", "forget_generation"), {"generation": generation}
                )
                log.info("dropped dedup generation %s", generation)
        log.info("started dedup generation %s", current + 1)
        return True
