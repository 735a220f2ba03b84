"""Rows read by name, and the one exception: a checked tuple on the hot path.

Every other query here reads its rows by column name (psycopg's `class_row`,
`namedtuple_row`, `dict_row`): a column added, removed or reordered in a .sql file then fails
loudly, where positional unpacking would silently hand one column's value to another field.

The router's pickup makes one row per job it delivers, and building it from a tuple costs a
fraction of what a row factory does per row. There a query's columns are compared with the
names the caller expects once per process (`check_columns`), against the cursor's
description, and the tuples are then taken as they come.
"""

from __future__ import annotations

from typing import Any

from psycopg import AsyncCursor

_checked: set[tuple[str, tuple[str, ...]]] = set()


class ColumnsChanged(RuntimeError):
    """A query's columns are not the ones its caller unpacks, in that order."""


def check_columns(cur: AsyncCursor[Any], query_name: str, expected: tuple[str, ...]) -> None:
    """Raise ColumnsChanged unless the cursor's columns are `expected`, in order (checked
    once per query and expected names per process; a cursor with no result is not checked)."""
    key = (query_name, expected)
    if key in _checked or cur.description is None:
        return
    names = tuple(column.name for column in cur.description)
    if names != expected:
        raise ColumnsChanged(f"{query_name} returns columns {names}, its caller expects"
                             f" {expected}")
    _checked.add(key)
