"""Job filters: the filter language (filterlang) over a job's columns, compiled to a
parameterised WHERE fragment on `jobs j` for the admin's reads and changes.

    destination = 'd1' AND state IN ('failed','waiting') AND attempts >= 3
        AND payload.event = 'Order Completed' AND created_at > '2026-11-01'

The grammar and the parser are filterlang's; this module knows the fields (the jobs table's
columns, and payload.<path> into the event document) and how each becomes SQL.

Everything the operator typed reaches Postgres as a parameter: the SQL text is assembled only
from the fixed fragments in this module, so no filter can change the statement's shape, and
every value is checked here first (types, enum values, timestamps, LIKE patterns) so that a
filter which compiles never makes Postgres raise. Errors are FilterError, carrying the 1-based
column and what was expected there; the admin service turns them into INVALID_ARGUMENT.

Semantics worth knowing (they follow SQL's three-valued logic, as an SQL-like language should):
- A comparison with a missing value (error_code when there is none, a payload key that is not
  there) is unknown, so neither `x = v` nor `x != v` nor `NOT x = v` matches it; use IS NULL.
- payload.<path> is read with `#>`/`#>>` on a text[] path, so a segment that is an integer
  indexes an array (payload.items.0.sku). The literal decides how a value is compared:
  a string compares the value's text form (`#>>`), so payload.order = '10' matches both "10"
  and 10, which is what people typing ids expect; a number compares numerically and only
  against JSON numbers (10 > 9, 10 = 10.0, never "10"); TRUE/FALSE only against JSON booleans.
  LIKE uses the text form. IS NULL means the key is missing or holds JSON null.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal, LiteralString, TypeAlias

from psycopg import sql

from filterlang.errors import reject_null, reject_operator, reject_value
from filterlang.nodes import (
    ORDERING,
    And,
    Compare,
    Field,
    InList,
    IsNull,
    Like,
    Node,
    Not,
    Or,
    Predicate,
    Value,
)
from filterlang.parser import Language, is_empty
from filterlang.parser import parse as parse_language

# The job_state enum of jobsdb/migrations/0001_initial.sql, in its order.
STATES: Final = ("pending", "failed", "waiting", "succeeded", "aborted")

FIELDS: Final = (
    "job_id", "tenant", "source", "destination", "user_id", "message_id", "state", "attempts",
    "error_code", "created_at", "updated_at", "payload",
)

JOBS: Final = Language(
    fields=frozenset(FIELDS) - {"payload"},
    documents=frozenset({"payload"}),
    expected="a field (job_id, tenant, source, destination, user_id, message_id, state, "
             "attempts, error_code, created_at, updated_at or payload.<key>)",
)


# The fields of an event of the log, for ListEvents (its source is the request's): its
# columns, payload.<path>, and the fields of connection and replay filters (filterlang.events:
# type, event, anonymous_id, properties.<path>, context.<path>, paths into the document), so a
# replay's filter lists what it would send. user_id is the column (the ordering key: the
# event's userId, or its anonymousId when it has none).
EVENT_FIELDS: Final = ("event_id", "user_id", "message_id", "created_at", "payload")
_IN_DOCUMENT: Final = {"type": ("type",), "event": ("event",),
                       "anonymous_id": ("anonymousId",), "properties": ("properties",),
                       "context": ("context",)}

EVENTS: Final = Language(
    fields=frozenset(EVENT_FIELDS) - {"payload"} | {"type", "event", "anonymous_id"},
    documents=frozenset({"payload", "properties", "context"}),
    expected="a field (event_id, user_id, message_id, created_at, type, event, anonymous_id, "
             "properties.<key>, context.<key> or payload.<key>)",
)


def compile_event_list_filter(text: str) -> Compiled | None:
    """An operator's filter over the log's events (EVENTS), as a WHERE fragment on `j`, an
    event with its document as `j.payload`; None for an empty one (every event)."""
    if is_empty(text):
        return None
    node = parse_language(text, EVENTS)
    params = Params()
    where = _node(node, params)
    return Compiled(sql.Composed([where]), params.values, node)


def parse(text: str) -> Node:
    """Parse a job filter into its AST. An empty filter is an error here (compile_filter
    allows it)."""
    return parse_language(text, JOBS)


class Params:
    """The values of a composed statement, each under a name of its own (`<prefix><n>`), so
    the fragments that make a statement and the statement's own named parameters can be put
    together in any order without a value landing on another's placeholder. Fragments made
    for one statement use one Params, or Params of different prefixes."""

    def __init__(self, prefix: str = "f") -> None:
        self.prefix = prefix
        self.values: dict[str, Any] = {}

    def add(self, value: Any, cast: LiteralString) -> sql.Composed:
        """`%(<name>)s::<cast>` for a new parameter holding `value`."""
        name = f"{self.prefix}{len(self.values)}"
        self.values[name] = value
        return sql.SQL("{}::" + cast).format(sql.Placeholder(name))


@dataclass(frozen=True)
class Compiled:
    """A WHERE fragment on `jobs j` with named placeholders (f0, f1, ...), and their values."""

    where: sql.Composed
    params: dict[str, Any]
    # The parsed filter (None: every job).
    node: Node | None = None


def compile_filter(text: str) -> Compiled | None:
    """Compile a filter; None for an empty one, which means every job (omit the WHERE part)."""
    if is_empty(text):
        return None
    node = parse(text)
    params = Params()
    where = _node(node, params)
    return Compiled(sql.Composed([where]), params.values, node)


ColumnKind: TypeAlias = Literal["key", "state", "integer", "text", "timestamp"]


@dataclass(frozen=True)
class _Column:
    kind: ColumnKind
    column: LiteralString
    # The type its values are cast to.
    cast: LiteralString = "text"
    nullable: bool = False
    # For tenant/source/destination: the key lookup by the text id operators type.
    lookup: LiteralString = ""
    bounds: tuple[int, int] = (0, 0)


_INT32: Final = (-(2**31), 2**31 - 1)
_INT64: Final = (-(2**63), 2**63 - 1)

# Filtering by the integer key through a subquery on the id, rather than joining the
# configuration tables, keeps the predicate on jobs' own columns, where its indexes are
# (jobs_pending_idx and friends lead with destination_key); the subquery is a handful of rows.
_COLUMNS: Final[dict[str, _Column]] = {
    "job_id": _Column("integer", "j.job_id", "bigint", bounds=_INT64),
    # Events only (EVENTS): jobs are filtered by job_id.
    "event_id": _Column("integer", "j.event_id", "bigint", bounds=_INT64),
    "attempts": _Column("integer", "j.attempts", "integer", bounds=_INT32),
    "tenant": _Column("key", "j.tenant_key", lookup="SELECT tenant_key FROM tenants"),
    "source": _Column("key", "j.source_key", lookup="SELECT source_key FROM sources"),
    "destination": _Column(
        "key", "j.destination_key", lookup="SELECT destination_key FROM destinations"),
    "user_id": _Column("text", "j.user_id"),
    "message_id": _Column("text", "j.message_id"),
    "error_code": _Column("text", "j.error_code", nullable=True),
    "state": _Column("state", "j.state", "job_state"),
    "created_at": _Column("timestamp", "j.created_at", "timestamptz"),
    "updated_at": _Column("timestamp", "j.updated_at", "timestamptz"),
}

_ALL_OPERATORS: Final = "=, !=, <, <=, >, >=, IN, NOT IN, LIKE, NOT LIKE"
# Which operators make sense for each kind of column (IS NULL only where a column can be null).
_ALLOWED: Final[dict[ColumnKind, str]] = {
    "key": _ALL_OPERATORS,
    "text": _ALL_OPERATORS,
    "state": "=, !=, IN, NOT IN",
    "integer": "=, !=, <, <=, >, >=, IN, NOT IN",
    "timestamp": "=, !=, <, <=, >, >=, IN, NOT IN",
}


def compile_node(node: Node, params: Params) -> sql.Composable:
    """A parsed filter (of the jobs language) as a WHERE fragment on `j`, its values added
    to `params`."""
    return _node(node, params)


def _node(node: Node, params: Params) -> sql.Composable:
    # Every composite is parenthesised, so the fragment can be ANDed into any WHERE as is.
    if isinstance(node, Or):
        return sql.SQL("({})").format(sql.SQL(" OR ").join(_node(n, params) for n in node.operands))
    if isinstance(node, And):
        return sql.SQL("({})").format(
            sql.SQL(" AND ").join(_node(n, params) for n in node.operands))
    if isinstance(node, Not):
        return sql.SQL("(NOT {})").format(_node(node.operand, params))
    if node.field.name in _IN_DOCUMENT:  # events only (EVENTS): a path into the document
        field = node.field
        node = dataclasses.replace(node, field=Field(
            "payload", (*_IN_DOCUMENT[field.name], *field.path), field.position))
    if node.field.name == "payload":
        return _payload(node, params)
    return _column(node, _COLUMNS[node.field.name], params)


def _column(node: Predicate, column: _Column, params: Params) -> sql.Composable:
    allowed = _ALLOWED[column.kind] + (", IS NULL, IS NOT NULL" if column.nullable else "")
    name = node.field.name
    if isinstance(node, IsNull):
        if not column.nullable:
            reject_operator(node, allowed, f"; {name} is never null")
        # Only nullable text columns get here.
        return sql.SQL("{} {}").format(
            sql.SQL(column.column), sql.SQL("IS NOT NULL" if node.negated else "IS NULL"))
    if isinstance(node, Like) and column.kind not in ("key", "text"):
        reject_operator(node, allowed)
    if isinstance(node, Compare) and node.op in ORDERING and column.kind == "state":
        reject_operator(node, allowed)
    convert = _converter(name, column)
    target = sql.SQL("id") if column.kind == "key" else sql.SQL(column.column)
    condition = _condition(target, node, convert, column.cast, params)
    if column.kind == "key":
        # `id != 'd1'` inside the lookup is the same set as outside it (every job's key names a
        # row and ids are unique), so one shape serves every operator.
        return sql.SQL("{} IN ({} WHERE {})").format(
            sql.SQL(column.column), sql.SQL(column.lookup), condition)
    return condition


def _condition(target: sql.Composable, node: Compare | InList | Like,
               convert: Callable[[Value], Any], cast: LiteralString,
               params: Params) -> sql.Composable:
    """`target <op> <parameter>` for one predicate, its converted value(s) added to params."""
    if isinstance(node, Compare):
        value = params.add(convert(node.value), cast)
        return sql.SQL("{} {} {}").format(target, sql.SQL(node.op), value)
    if isinstance(node, InList):
        # One array parameter instead of n placeholders: the statement text is the same for
        # every list length, which keeps pg_stat_statements and prepared plans to one entry.
        values = params.add([convert(v) for v in node.values], cast + "[]")
        shape = "{} <> ALL({})" if node.negated else "{} = ANY({})"
        return sql.SQL(shape).format(target, values)
    pattern = params.add(convert(node.pattern), cast)
    return sql.SQL("{} {} {}").format(
        target, sql.SQL("NOT LIKE" if node.negated else "LIKE"), pattern)


def _converter(name: str, column: _Column) -> Callable[[Value], Any]:
    """The check and conversion of one literal for a column: Postgres only sees valid values."""

    def convert(value: Value) -> Any:
        reject_null(value)
        if column.kind == "integer":
            low, high = column.bounds
            if value.kind != "number" or not isinstance(value.value, int):
                reject_value(value, f"an integer for {name}")
            if not low <= value.value <= high:
                reject_value(value, f"an integer for {name} between {low} and {high}")
            return value.value
        if value.kind != "string":
            hint = " (a date or time, quoted)" if column.kind == "timestamp" else ""
            reject_value(value, f"a quoted string for {name}{hint}")
        assert isinstance(value.value, str)
        if column.kind == "state" and value.value not in STATES:
            reject_value(value, "a job state (" + ", ".join(f"'{s}'" for s in STATES) + ")")
        if column.kind == "timestamp":
            return _timestamp(name, value)
        return value.value

    return convert


def _timestamp(name: str, value: Value) -> datetime:
    """An ISO 8601 date or datetime; without a zone it is UTC, whatever the session's TimeZone.

    Parsed here, not by Postgres, so that 'yesterday' is a FilterError at its column rather than
    a database error, and 'now' or 'epoch' (which Postgres would accept) mean nothing special.
    """
    assert isinstance(value.value, str)
    try:
        parsed = datetime.fromisoformat(value.value.strip())
    except (ValueError, OverflowError):
        reject_value(value, f"a date or time for {name} in ISO 8601, like '2026-11-01' or "
                             "'2026-11-01T12:00:00Z'")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# payload expressions. The path is a text[] parameter; a number or boolean is compared only
# when the value at the path has that JSON type (CASE guarantees the cast never sees another).
_PAYLOAD_TEXT: Final = "(j.payload #>> {path})"
_PAYLOAD_NUMBER: Final = (
    "(CASE WHEN jsonb_typeof(j.payload #> {path}) = 'number' "
    "THEN (j.payload #> {path})::numeric END)")
_PAYLOAD_BOOLEAN: Final = (
    "(CASE WHEN jsonb_typeof(j.payload #> {path}) = 'boolean' "
    "THEN (j.payload #> {path})::boolean END)")


def _payload(node: Predicate, params: Params) -> sql.Composable:
    path = list(node.field.path)
    if isinstance(node, IsNull):
        # #>> yields SQL NULL both for a missing key and for JSON null.
        text = sql.SQL(_PAYLOAD_TEXT).format(path=params.add(path, "text[]"))
        return sql.SQL("{} {}").format(text, sql.SQL("IS NOT NULL" if node.negated else "IS NULL"))
    if isinstance(node, Like):
        text = sql.SQL(_PAYLOAD_TEXT).format(path=params.add(path, "text[]"))
        return _condition(text, node, _text, "text", params)
    values = node.values if isinstance(node, InList) else (node.value,)
    kind = values[0].kind
    for value in values:
        reject_null(value)
        if value.kind != kind:
            reject_value(value, f"a {kind} like the first value (the values of an IN list on "
                                 "payload share one JSON type)")
    if kind == "string":
        text = sql.SQL(_PAYLOAD_TEXT).format(path=params.add(path, "text[]"))
        return _condition(text, node, _text, "text", params)
    if kind == "number":
        number = sql.SQL(_PAYLOAD_NUMBER).format(path=params.add(path, "text[]"))
        return _condition(number, node, _number, "numeric", params)
    if isinstance(node, Compare) and node.op in ORDERING:
        reject_operator(node, "=, !=, IN, NOT IN", " to compare with TRUE or FALSE")
    boolean = sql.SQL(_PAYLOAD_BOOLEAN).format(path=params.add(path, "text[]"))
    return _condition(boolean, node, _boolean, "boolean", params)


def _text(value: Value) -> str:
    assert isinstance(value.value, str)
    return value.value


def _number(value: Value) -> Decimal:
    assert isinstance(value.value, int | Decimal)
    return Decimal(value.value)


def _boolean(value: Value) -> bool:
    assert isinstance(value.value, bool)
    return value.value
