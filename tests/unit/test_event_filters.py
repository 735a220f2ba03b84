"""Connection filters as ingest evaluates them: filterlang.events on hand-made events.

The random comparison with Postgres (the job filters' SQL on the same documents) is in
tests/integration/test_subscriptions.py; here each rule is spelled out once, with the event it
is about.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from filterlang.errors import FilterError
from filterlang.events import compile_event_filter

ORDER: dict[str, Any] = orjson.loads(orjson.dumps({
    "type": "track",
    "event": "Order Completed",
    "userId": "alice",
    "properties": {
        "order_id": "1001",
        "revenue": 42.5,
        "quantity": 3,
        "big": 9007199254740993,
        "vip": True,
        "coupon": None,
        "note": "50% off_today \\ really",
        "items": [{"sku": "a-1", "price": 10}, {"sku": "b-2", "price": 32.5}],
        "nested": {"b": 1, "aa": [1, 2.0, "x"], "ccc": {"d": None}},
        "0": "a key that looks like an index",
        "ten": "10",
    },
    "context": {"library": {"name": "relayq-python", "version": "1.2.0"}, "ip": "10.0.0.1"},
}))
ANONYMOUS: dict[str, Any] = {"type": "page", "anonymousId": "anon-7", "properties": {}}


def matches(text: str, event: dict[str, Any] = ORDER) -> bool:
    compiled = compile_event_filter(text)
    assert compiled is not None
    return compiled.matches(event)


@pytest.mark.parametrize(("text", "expected"), [
    # The envelope's text fields.
    ("type = 'track'", True),
    ("event = 'Order Completed'", True),
    ("event IN ('Order Completed', 'Order Refunded')", True),
    ("event NOT IN ('Order Completed')", False),
    ("user_id = 'alice'", True),
    ("USER_ID = 'alice' and Type = 'track'", True),
    ("event > 'Order' AND event < 'Order D'", True),
    # Nested paths, array indexes (from the end with a quoted negative one), keys that look
    # like indexes on objects, quoted keys.
    ("properties.items.1.sku = 'b-2'", True),
    ("properties.items.\"-1\".sku = 'b-2'", True),
    ("properties.items.\"-2\".sku = 'a-1'", True),
    ("properties.items.\"-3\".sku IS NULL", True),
    ("properties.items.2.sku IS NULL", True),
    ("properties.items.sku IS NULL", True),
    ("properties.0 = 'a key that looks like an index'", True),
    ("properties.\"order_id\" = '1001'", True),
    ("context.library.name LIKE 'relayq-%'", True),
    ("context.library.version = '1.2.0'", True),
    # Numbers compare numerically, and only with JSON numbers.
    ("properties.revenue >= 42.5", True),
    ("properties.revenue > 42", True),
    ("properties.revenue = 42.50", True),
    ("properties.quantity = 3.0", True),
    ("properties.quantity IN (1, 2, 3)", True),
    ("properties.items.1.price IN (32.5, 7)", True),
    ("properties.big = 9007199254740993", True),
    ("properties.big > 9007199254740992", True),
    ("properties.ten = 10", False),
    ("properties.ten != 10", False),
    ("properties.order_id > 1000", False),
    # A quoted string compares the value's text form.
    ("properties.quantity = '3'", True),
    ("properties.revenue = '42.5'", True),
    ("properties.vip = 'true'", True),
    ("properties.nested.aa = '[1, 2.0, \"x\"]'", True),
    # jsonb orders an object's keys by length, then bytes.
    ("properties.nested = '{\"b\": 1, \"aa\": [1, 2.0, \"x\"], \"ccc\": {\"d\": null}}'", True),
    ("properties.quantity LIKE '3'", True),
    # Booleans only with JSON booleans.
    ("properties.vip = TRUE", True),
    ("properties.vip != FALSE", True),
    ("properties.vip IN (TRUE)", True),
    ("properties.quantity = TRUE", False),
    ("properties.quantity != TRUE", False),
    # IS NULL: missing, or JSON null.
    ("properties.coupon IS NULL", True),
    ("properties.nested.ccc.d IS NULL", True),
    ("properties.nested.ccc IS NOT NULL", True),
    ("properties.missing IS NULL", True),
    ("context.missing.deeper IS NULL", True),
    ("anonymous_id IS NULL", True),
    ("user_id IS NOT NULL", True),
    # LIKE: % any run, _ one character, \ makes the next one literal.
    ("event LIKE 'Order%'", True),
    ("event LIKE 'order%'", False),
    ("event LIKE 'Order_Completed'", True),
    ("event LIKE 'Order__Completed'", False),
    ("event LIKE '%Comp%ted'", True),
    ("event LIKE '%Comp%Comp%'", False),
    ("event LIKE '%'", True),
    ("event LIKE '%%Order Completed%%'", True),
    ("properties.note LIKE '50\\% off%'", True),
    ("properties.note LIKE '5_\\%%'", True),
    ("properties.note LIKE '%\\_today%'", True),
    ("properties.note LIKE '%\\\\ really'", True),
    ("properties.note LIKE '50\\%\\_%'", False),
    ("event NOT LIKE 'Order%'", False),
])
def test_one_rule_each(text: str, expected: bool) -> None:
    assert matches(text) is expected


@pytest.mark.parametrize("text", [
    # Unknown (a missing field, JSON null) is neither true nor false, and NOT keeps it so.
    "properties.missing = 'x'",
    "properties.missing != 'x'",
    "NOT properties.missing = 'x'",
    "properties.coupon = 'x'",
    "properties.coupon != 'x'",
    "properties.missing IN ('x')",
    "properties.missing NOT IN ('x')",
    "properties.missing LIKE '%'",
    "properties.missing NOT LIKE 'x'",
    "anonymous_id = 'anon-7'",
    "anonymous_id != 'anon-7'",
    "NOT anonymous_id LIKE 'anon%'",
    # A value of another JSON type than the literal is unknown too.
    "properties.ten > 5",
    "NOT properties.ten > 5",
    "properties.vip = 1",
    "NOT properties.vip = 1",
    # Unknown AND true is unknown; unknown OR false is unknown.
    "properties.missing = 'x' AND type = 'track'",
    "properties.missing = 'x' OR type = 'page'",
    "NOT (properties.missing = 'x' OR type = 'page')",
])
def test_what_cannot_be_evaluated_does_not_match(text: str) -> None:
    assert matches(text) is False


@pytest.mark.parametrize(("text", "expected"), [
    # ... but it does not spoil a decided AND or OR.
    ("properties.missing = 'x' AND type = 'page'", False),
    ("NOT (properties.missing = 'x' AND type = 'page')", True),
    ("properties.missing = 'x' OR type = 'track'", True),
    ("properties.missing IS NULL OR properties.missing = 'x'", True),
    ("NOT (NOT type = 'track')", True),
    ("type = 'page' OR event = 'Order Completed' AND user_id = 'alice'", True),
    ("(type = 'page' OR event = 'Order Completed') AND user_id = 'bob'", False),
])
def test_three_valued_logic(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_an_event_without_user_id_or_body() -> None:
    assert matches("anonymous_id = 'anon-7' AND user_id IS NULL", ANONYMOUS)
    assert not matches("user_id != 'alice'", ANONYMOUS)
    assert not matches("event LIKE '%'", ANONYMOUS)
    assert matches("event IS NULL AND properties.x IS NULL AND context.x IS NULL", ANONYMOUS)


def test_a_number_written_in_text_form_like_postgres_prints_it() -> None:
    event = {"properties": {"a": 1e16, "b": 1.5e-7, "c": -0.0, "d": 100.0, "e": -12}}
    assert matches("properties.a = '10000000000000000'", event)
    assert matches("properties.b = '0.00000015'", event)
    assert matches("properties.c = '0.0'", event)
    assert matches("properties.d = '100.0'", event)
    assert matches("properties.e LIKE '-1_'", event)


def test_a_decimal_literal_equals_the_number_a_json_parser_reads() -> None:
    """0.1 in JSON is the double nearest 0.1; so is the literal, compared as a double too."""
    event = {"properties": {"price": 0.1, "total": 0.30000000000000004, "count": 3}}
    assert matches("properties.price = 0.1", event)
    assert matches("properties.price IN (0.2, 0.1)", event)
    assert not matches("properties.price < 0.1", event)
    assert not matches("properties.price > 0.1", event)
    assert not matches("properties.total = 0.3", event)
    assert matches("properties.count = 3.000 AND properties.count < 3.001", event)


def test_a_pathological_like_pattern_takes_linear_time() -> None:
    """'%a%a...%b' on a long run of a's is exponential for a backtracking matcher; this one
    takes each piece at its leftmost place once (the suite's timeout would catch a regression)."""
    event = {"properties": {"text": "a" * 60_000}}
    assert not matches("properties.text LIKE '" + "%a" * 30 + "%b'", event)
    assert matches("properties.text LIKE '" + "%a" * 30 + "%'", event)
    assert matches("properties.text LIKE '" + "a%" * 30 + "a'", event)


def test_empty_filters_take_every_event() -> None:
    assert compile_event_filter("") is None
    assert compile_event_filter("  \n\t") is None


# (filter, 1-based column, part of what was expected there)
MALFORMED: list[tuple[str, int, str]] = [
    ("payload.event = 'x'", 1, "a field (type, event, user_id, anonymous_id, properties.<key>"),
    ("state = 'failed'", 1, "a field (type, event"),
    ("event = 'x' AND attempts > 1", 17, "a field (type"),
    ("properties = 'x'", 12, "'.' and a key after properties (properties.<key>)"),
    ("context.  = 'x'", 11, "a key after '.'"),
    ("type = 5", 8, "a quoted string for type"),
    ("event IN ('a', TRUE)", 16, "a quoted string for event"),
    ("user_id = NULL", 11, "use IS NULL"),
    ("properties.x = NULL", 16, "use IS NULL"),
    ("properties.x IN ('a', 1)", 23, "a string like the first value"),
    ("properties.x IN (1, 'a')", 21, "a number like the first value"),
    ("properties.vip > TRUE", 16, "(=, !=, IN, NOT IN) to compare with TRUE or FALSE"),
    ("event LIKE 'x\\'", 12, "does not end in a lone \\"),
    ("event = 'Order Completed", 9, "a closing ' for the string"),
    ("event = 'a' OR", 15, "a field, NOT or '('"),
    ("(event = 'a'", 13, "AND, OR or ')'"),
    ("event == 'a'", 8, "a value"),
]


@pytest.mark.parametrize(("text", "position", "expected"), MALFORMED)
def test_a_malformed_filter_is_refused_at_its_column(text: str, position: int,
                                                     expected: str) -> None:
    with pytest.raises(FilterError) as caught:
        compile_event_filter(text)
    error = caught.value
    assert (error.position, expected in error.expected) == (position, True), error.message
