"""Connection filters: the filter language over one event, evaluated by ingest at fan-out.

    event IN ('Order Completed', 'Order Refunded') AND properties.revenue >= 100
        AND NOT context.library.name LIKE 'test-%'

The grammar, the parser and FilterError (1-based columns) are filterlang's; the fields
are the event's as delivered: `type`, `event`, `user_id`, `anonymous_id` (text; missing when the
event has none) and `properties.<path>`, `context.<path>` (paths into the JSON objects, an
integer segment indexing an array, as payload.<path> in job filters).

A filter is compiled once, when ingest loads a source's route (so once per configuration
change), into nested closures over the event document: matching an event walks no AST and
parses no text. `compile_event_filter` refuses what the SQL compiler of job filters refuses for
payload paths, with the same messages, and the evaluation has the same three-valued meaning,
so `properties.x = '10'` means here what `payload.properties.x = '10'` means in a job filter
(tests/integration/test_subscriptions.py checks one against the other on random events and filters):

- A comparison with a missing field, or with JSON null, is unknown: neither `x = v` nor
  `x != v` nor `NOT x = v` matches. An event matches only when the whole filter is true, so a
  filter that cannot be evaluated against an event simply does not match it. IS NULL is true
  for a missing field and for JSON null.
- A quoted string compares the value's text form: a JSON string as is, a number as its decimal
  digits, true/false, an object or array as Postgres prints jsonb. Ordering (<, >) is by code
  point, as in the C collation.
- A number compares only with JSON numbers, numerically; TRUE/FALSE only with JSON booleans.
- LIKE: `%` any run of characters, `_` one character, `\\` makes the next one literal; it uses
  the text form; matching never backtracks (at most the text's length times the pattern's).

Where this differs from Postgres: numbers are read as JSON parsers read them (floating point
beyond 2^53 or 17 significant digits, so 0.1 and 0.10000000000000000001 are equal here), and the
text form of a number is its shortest spelling (1.50 reads '1.5' here, '1.50' in jsonb).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TypeAlias

from filterlang.errors import reject_null, reject_operator, reject_value
from filterlang.like import like_matcher
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
from filterlang.parser import Language, is_empty, parse

# Filter field -> key in the delivered event document (jobsdb.ingest's document, built by
# ingest_service.validate): the text fields of the envelope.
TEXT_FIELDS: Final = {
    "type": "type",
    "event": "event",
    "user_id": "userId",
    "anonymous_id": "anonymousId",
}
DOCUMENT_FIELDS: Final = ("properties", "context")

EVENTS: Final = Language(
    fields=frozenset(TEXT_FIELDS),
    documents=frozenset(DOCUMENT_FIELDS),
    expected="a field (type, event, user_id, anonymous_id, properties.<key> or "
             "context.<key>)",
)

Event: TypeAlias = Mapping[str, Any]
# Three-valued: True, False, or None for unknown (SQL's NULL).
_Test: TypeAlias = Callable[[Event], bool | None]
_Get: TypeAlias = Callable[[Event], Any]


@dataclass(frozen=True, slots=True)
class EventFilter:
    """A connection's filter, ready to run against many events."""

    text: str
    # The filter's value for an event: True, False, or None when unknown. Only True matches.
    evaluate: _Test

    def matches(self, event: Event) -> bool:
        """True only when the filter is true for the event (unknown does not match)."""
        return self.evaluate(event) is True


def compile_event_filter(text: str) -> EventFilter | None:
    """Compile a connection filter; None for an empty one (every event passes).

    Raises FilterError, with the column, for anything the language refuses."""
    if is_empty(text):
        return None
    node = parse(text, EVENTS)
    return EventFilter(text, _compile(node))


# ---------------------------------------------------------------------------------------------
# Nodes -> closures.
# ---------------------------------------------------------------------------------------------


def _compile(node: Node) -> _Test:
    if isinstance(node, And | Or):
        return _junction([_compile(n) for n in node.operands], isinstance(node, Or))
    if isinstance(node, Not):
        inner = _compile(node.operand)

        def negated(event: Event) -> bool | None:
            result = inner(event)
            return None if result is None else not result

        return negated
    return _predicate(node)


def _junction(tests: list[_Test], decisive: bool) -> _Test:
    """AND (decisive False) or OR (decisive True), three-valued: one decisive operand decides,
    else any unknown operand leaves the whole unknown."""

    def junction(event: Event) -> bool | None:
        unknown = False
        for test in tests:
            result = test(event)
            if result is decisive:
                return decisive
            if result is None:
                unknown = True
        return None if unknown else not decisive

    return junction


_COMPARE: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}


def _predicate(node: Predicate) -> _Test:
    get = _getter(node.field)
    if isinstance(node, IsNull):
        if node.negated:
            return lambda event: get(event) is not None
        return lambda event: get(event) is None
    if isinstance(node, Like):
        return _like(get, node)
    values = node.values if isinstance(node, InList) else (node.value,)
    for value in values:
        reject_null(value)
    if node.field.name in TEXT_FIELDS:
        # The envelope's fields are always text: a number or TRUE could never match.
        for value in values:
            if value.kind != "string":
                reject_value(value, f"a quoted string for {node.field.name}")
    kind = values[0].kind
    for value in values:
        if value.kind != kind:
            reject_value(value, f"a {kind} like the first value (the values of an IN list on "
                                 f"{node.field.name} share one JSON type)")
    if kind == "string":
        # A string is compared as is; any other value by its text form.
        return _compared(get, node, [v.value for v in values], (str,), _json_text)
    if kind == "number":
        # bool is not among them: True is an int in Python, never a number in JSON.
        return _compared(get, node, [_number(v) for v in values], (int, float), None)
    if isinstance(node, Compare) and node.op in ORDERING:
        reject_operator(node, "=, !=, IN, NOT IN", " to compare with TRUE or FALSE")
    return _compared(get, node, [v.value for v in values], (bool,), None)


def _compared(get: _Get, node: Compare | InList, literals: list[Any],
              types: tuple[type, ...], convert: Callable[[Any], Any] | None) -> _Test:
    """`value <op> literal` or `value [NOT] IN (literals)`. A value whose Python type is not
    among `types` is turned into one by `convert`, or, with none (another JSON type than the
    literal's), is unknown, as in SQL; so is a missing value or JSON null.

    The type check is inlined (exact classes: JSON parsers build no subclasses) because this
    runs for every event and every connection that has a filter."""
    if isinstance(node, InList):
        members = frozenset(literals)
        negated = node.negated

        def within(event: Event) -> bool | None:
            value = get(event)
            if value.__class__ not in types:
                if value is None or convert is None:
                    return None
                value = convert(value)
            return (value in members) is not negated

        return within
    literal, compare = literals[0], _COMPARE[node.op]

    def compared(event: Event) -> bool | None:
        value = get(event)
        if value.__class__ not in types:
            if value is None or convert is None:
                return None
            value = convert(value)
        return compare(value, literal)

    return compared


def _like(get: _Get, node: Like) -> _Test:
    assert isinstance(node.pattern.value, str)
    match = like_matcher(node.pattern.value)
    negated = node.negated

    def like(event: Event) -> bool | None:
        text = _text(get(event))
        if text is None:
            return None
        return match(text) is not negated

    return like


# ---------------------------------------------------------------------------------------------
# Reading the event.
# ---------------------------------------------------------------------------------------------

# What strtol accepts, as Postgres reads an array subscript in a jsonb path (#>): optional
# leading whitespace and sign, then decimal digits; a negative one counts from the end.
_SUBSCRIPT: Final = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_INT32: Final = 2**31


def _getter(subject: Field) -> _Get:
    """A function from the event document to the field's value (None: missing or JSON null)."""
    if subject.name in TEXT_FIELDS:
        key = TEXT_FIELDS[subject.name]
        return lambda event: event.get(key)
    keys = (subject.name, *subject.path)
    steps = [(key, _subscript(key)) for key in keys]
    if all(index is None for _, index in steps):
        # Object keys only (the usual case): a dict lookup per step.

        def lookup(event: Event) -> Any:
            value: Any = event
            for key in keys:
                if value.__class__ is not dict:
                    return None
                value = value.get(key)
            return value

        return lookup

    def walk(event: Event) -> Any:
        value: Any = event
        for key, index in steps:
            if value.__class__ is dict:
                value = value.get(key)
            elif value.__class__ is list and index is not None:
                if not -len(value) <= index < len(value):
                    return None
                value = value[index]
            else:
                return None
        return value

    return walk


def _subscript(key: str) -> int | None:
    if not _SUBSCRIPT.fullmatch(key):
        return None
    index = int(key)
    return index if -_INT32 <= index < _INT32 else None


def _text(value: Any) -> str | None:
    """The text form Postgres gives a jsonb value with #>> (None for null)."""
    if value is None or isinstance(value, str):
        return value
    return _json_text(value)


def _json_text(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Positional digits, as numeric prints: 1e+16 -> 10000000000000000. No negative zero.
        text = format(Decimal(repr(value)), "f")
        return text[1:] if value == 0 and text.startswith("-") else text
    if isinstance(value, dict):
        # jsonb keeps an object's keys ordered by length, then by their bytes.
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(
            f"{json.dumps(k, ensure_ascii=False)}: {_json_text(value[k])}" for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json_text(v) for v in value) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _number(value: Value) -> int | float:
    """A literal as the event's numbers are read: integers exactly, fractions as floats (so
    `x = 0.1` matches the JSON 0.1 as a parser reads it)."""
    assert isinstance(value.value, int | Decimal)
    if isinstance(value.value, int):
        return value.value
    if value.value == value.value.to_integral_value():
        return int(value.value)
    return float(value.value)
