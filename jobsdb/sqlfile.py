"""Named SQL queries, loaded once from jobsdb/sql/*.sql.

A file holds blocks introduced by `-- name: <query>`; the comment lines that follow the marker
document the query for its readers. Postgres sees the query without its comment lines, under
one line naming it (`-- ingest.sql store_events`, handy in pg_stat_activity and
pg_stat_statements): psycopg parses a query text of more than 4 KB again on every execution,
and the long comments of the hottest queries (store_events, record_outcomes) took them past it.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import LiteralString, cast

_MARKER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@cache
def queries(filename: str) -> dict[str, LiteralString]:
    text = resources.files("jobsdb").joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _MARKER.split(text)
    found: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in found:
            raise ValueError(f"{filename}: query {name!r} is defined twice")
        # The files ship with the package and are reviewed like code: they are as literal as
        # the strings in a .py file, which is what LiteralString asks for.
        lines = [line for line in body.strip().splitlines()
                 if not line.lstrip().startswith("--")]
        statement = "\n".join([f"-- {filename} {name}", *lines])
        found[name] = cast(LiteralString, statement)  # type: ignore[redundant-cast]
    return found


def query(filename: str, name: str) -> LiteralString:
    try:
        return queries(filename)[name]
    except KeyError:
        raise KeyError(f"no query {name!r} in jobsdb/sql/{filename}") from None
