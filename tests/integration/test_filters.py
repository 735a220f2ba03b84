"""The admin filter language: errors with columns, the AST, and what the SQL selects in Postgres."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from filterlang.errors import FilterError
from filterlang.nodes import And, Compare, Field, InList, IsNull, Like, Node, Not, Or, Value
from filterlang.parser import MAX_LENGTH
from jobsdb import filters
from jobsdb.filters import Compiled, compile_filter, parse
from jobsdb.keyspace import job_id, partition_of
from jobsdb.sqlfile import query

_LONG_IN = "job_id IN (" + ",".join(str(i) for i in range(1001)) + ")"
_AT_1001ST = len("job_id IN (" + ",".join(str(i) for i in range(1000)) + ",") + 1

# (filter, 1-based column, part of what was expected there)
MALFORMED: list[tuple[str, int, str]] = [
    ("user_id = 'abc", 11, "a closing ' for the string"),
    ('payload."key = 1', 9, 'a closing " for the quoted key'),
    ("foo = 1", 1, "a field (job_id, tenant"),
    ("AND job_id = 1", 1, "a field (job_id"),
    ("attempts >= ", 13, "a value"),
    ("state = 'failed' AND", 21, "a field, NOT or '('"),
    ("job_id = 1 OR", 14, "a field, NOT or '('"),
    ("()", 2, "a field, NOT or '('"),
    ("(state = 'failed'", 18, "AND, OR or ')'"),
    ("state = 'failed')", 17, "AND, OR or end of filter"),
    ("user_id = 'a' user_id = 'b'", 15, "AND, OR or end of filter"),
    ("user_id = 'a'; DROP TABLE jobs", 14, "AND, OR or end of filter"),
    ("attempts == 3", 11, "a value"),
    ("attempts => 3", 11, "a value"),
    ("attempts ! 3", 10, "an operator (=, !="),
    ("attempts 3", 10, "an operator (=, !="),
    ("attempts IS 3", 13, "NULL or NOT NULL"),
    ("job_id \u0131n (1)", 8, "an operator (=, !="),
    ("error_code IS NOT 3", 19, "NULL after IS NOT"),
    ("user_id NOT = 'x'", 13, "IN or LIKE after NOT"),
    ("user_id IN 'a'", 12, "'(' after IN"),
    ("state IN ()", 11, "a value"),
    ("user_id IN ('a' 'b')", 17, "',' or ')'"),
    ("attempts = 1.2.3", 12, "a value"),
    ("payload. = 'x'", 10, "a key after '.'"),
    ("payload = 'x'", 9, "'.' and a key after payload"),
    ("user_id LIKE 3", 14, "a quoted pattern after LIKE"),
    ("user_id LIKE 'a\\'", 14, "does not end in a lone \\"),
    ("state = 'nope'", 9, "a job state ('pending', 'failed'"),
    ("state = 'FAILED'", 9, "a job state"),
    ("state > 'failed'", 7, "an operator for state (=, !=, IN, NOT IN)"),
    ("state LIKE 'f%'", 7, "an operator for state"),
    ("attempts = 'x'", 12, "an integer for attempts"),
    ("attempts = 1.5", 12, "an integer for attempts"),
    ("job_id = 99999999999999999999", 10, "an integer for job_id between"),
    ("attempts LIKE '1%'", 10, "an operator for attempts"),
    ("user_id = 5", 11, "a quoted string for user_id"),
    ("error_code = NULL", 14, "use IS NULL"),
    ("job_id IN (1, NULL)", 15, "use IS NULL"),
    ("payload.x = NULL", 13, "use IS NULL"),
    ("tenant IS NULL", 8, "tenant is never null"),
    ("attempts IS NOT NULL", 10, "attempts is never null"),
    ("created_at > 'yesterday'", 14, "a date or time for created_at in ISO 8601"),
    ("updated_at < '2026-13-01'", 14, "ISO 8601"),
    ("created_at > 5", 14, "a quoted string for created_at"),
    ("payload.vip > TRUE", 13, "(=, !=, IN, NOT IN) to compare with TRUE or FALSE"),
    ("payload.x IN ('a', 1)", 20, "a string like the first value"),
    ("user_id = 'a\x00b'", 13, "a character other than NUL"),
    ("(" * 33 + "job_id = 1" + ")" * 33, 33, "at most 32 levels"),
    ("NOT " * 33 + "job_id = 1", 129, "at most 32 levels"),
    ("user_id = '" + "a" * 4100 + "'", 4097, "at most 4096 characters"),
    (_LONG_IN, _AT_1001ST, "at most 1000 values in an IN list"),
]


@pytest.mark.parametrize(("text", "position", "expected"), MALFORMED)
def test_a_malformed_filter_is_rejected_at_its_column(
    text: str, position: int, expected: str
) -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter(text)
    error = caught.value
    assert (error.position, expected in error.expected) == (position, True), error.message
    assert error.message == f"column {position}: expected {error.expected}, found {error.found}"
    assert str(error) == error.message


def test_an_error_names_what_it_found() -> None:
    with pytest.raises(FilterError) as caught:
        compile_filter("state IN ('failed',)")
    assert caught.value.message == (
        "column 20: expected a value (a quoted string, a number, TRUE or FALSE), found ')'")
    with pytest.raises(FilterError) as caught:
        compile_filter("attempts >=")
    assert caught.value.found == "end of filter"
    with pytest.raises(FilterError) as caught:
        compile_filter("state = 'nope'")
    assert caught.value.found == "'nope'"


def test_an_empty_filter_means_everything_but_does_not_parse() -> None:
    assert compile_filter("") is None
    assert compile_filter(" \n\t ") is None
    with pytest.raises(FilterError, match="column 1: expected a field, NOT or"):
        parse("")


def field(name: str, *path: str) -> Field:
    return Field(name, path)


def s(text: str) -> Value:
    return Value("string", text)


def n(number: int | str) -> Value:
    return Value("number", Decimal(number) if isinstance(number, str) else number)


@pytest.mark.parametrize(("text", "tree"), [
    # NOT binds tighter than AND, AND tighter than OR.
    ("user_id = 'a' OR attempts > 1 AND NOT state = 'failed'",
     Or((Compare(field("user_id"), "=", s("a")),
         And((Compare(field("attempts"), ">", n(1)),
              Not(Compare(field("state"), "=", s("failed")))))))),
    ("(user_id = 'a' OR attempts > 1) AND state != 'failed'",
     And((Or((Compare(field("user_id"), "=", s("a")), Compare(field("attempts"), ">", n(1)))),
          Compare(field("state"), "!=", s("failed"))))),
    ("NOT (job_id = 1 OR job_id = 2) OR NOT NOT job_id = 3",
     Or((Not(Or((Compare(field("job_id"), "=", n(1)), Compare(field("job_id"), "=", n(2))))),
         Not(Not(Compare(field("job_id"), "=", n(3))))))),
    ("job_id = 1 AND job_id = 2 AND job_id = 3",
     And(tuple(Compare(field("job_id"), "=", n(i)) for i in (1, 2, 3)))),
    # Keywords and field names in any case; <> is !=; '' is a quote.
    ("STATE in ('failed', 'waiting') and Not user_id LIKE 'it''s%'",
     And((InList(field("state"), (s("failed"), s("waiting"))),
          Not(Like(field("user_id"), s("it's%")))))),
    ("attempts <> 3", Compare(field("attempts"), "!=", n(3))),
    ("attempts<=-3", Compare(field("attempts"), "<=", n(-3))),
    ("user_id NOT IN ('a') OR user_id NOT LIKE '%b'",
     Or((InList(field("user_id"), (s("a"),), negated=True),
         Like(field("user_id"), s("%b"), negated=True)))),
    ("error_code IS NULL AND payload.x IS NOT NULL",
     And((IsNull(field("error_code")), IsNull(field("payload", "x"), negated=True)))),
    # payload paths: names, array indexes, "quoted keys" with spaces, dots or quotes.
    ('payload.items.0."unit price" >= 10.50',
     Compare(field("payload", "items", "0", "unit price"), ">=", n("10.50"))),
    ('payload."a.b"."say ""hi""".And = TRUE',
     Compare(field("payload", "a.b", 'say "hi"', "And"), "=", Value("boolean", True))),
    ("payload.flag IN (true, FALSE)",
     InList(field("payload", "flag"), (Value("boolean", True), Value("boolean", False)))),
    ("payload.city = 'Zürich'", Compare(field("payload", "city"), "=", s("Zürich"))),
])
def test_valid_filters_parse_to_their_tree(text: str, tree: Node) -> None:
    assert parse(text) == tree


def test_the_tree_keeps_columns_for_later_errors() -> None:
    tree = parse("job_id = 1 AND  payload.x IN (1, 'a')")
    assert isinstance(tree, And)
    second = tree.operands[1]
    assert isinstance(second, InList)
    assert (second.field.position, second.position, second.values[1].position) == (17, 27, 34)


def test_the_brief_example_compiles_to_parameters_only() -> None:
    compiled = compile_filter(
        "destination = 'd1' AND state IN ('failed','waiting') AND attempts >= 3 "
        "AND payload.event = 'Order Completed' AND created_at > '2026-11-01'")
    assert compiled is not None
    assert compiled.where.as_string(None) == (
        "(j.destination_key IN (SELECT destination_key FROM destinations"
        " WHERE id = %(f0)s::text) AND j.state = ANY(%(f1)s::job_state[])"
        " AND j.attempts >= %(f2)s::integer AND (j.payload #>> %(f3)s::text[]) = %(f4)s::text"
        " AND j.created_at > %(f5)s::timestamptz)")
    assert {name: str(p) for name, p in compiled.params.items()} == {
        "f0": "d1", "f1": "['failed', 'waiting']", "f2": "3", "f3": "['event']",
        "f4": "Order Completed", "f5": "2026-11-01 00:00:00+00:00"}


# ---------------------------------------------------------------------------------------------
# Against Postgres.
# ---------------------------------------------------------------------------------------------

# Jobs 1-5 (labels: their ids are (event_id << 16) | slot, see JOB_IDS), each of its own
# event: label, destination, source, state, attempts, user, message, error, created_at,
# payload. Failed, waiting and aborted jobs have rows; the pending and the succeeded one are
# derived from the log (no row), as most jobs are.
JOBS: list[tuple[int, str, str, str, int, str, str, str | None, str, str]] = [
    (1, "d1", "web", "pending", 0, "u1", "m1", None, "2026-10-01T00:00:00Z",
     '{"event": "Order Completed", "total": 10, "vip": true, "items": [{"sku": "a"}]}'),
    (2, "d1", "web", "failed", 3, "u2", "m2", "timeout", "2026-11-02T00:00:00Z",
     '{"event": "Order Completed", "total": 9.5, "tags": null}'),
    (3, "d2", "app", "waiting", 4, "u1", "m3", None, "2026-11-03T00:00:00Z",
     '{"event": "Signed Up", "total": "10", "vip": false, "a b": {"c.d": 1}}'),
    (4, "d3", "api", "succeeded", 1, "u3", "m4", None, "2026-11-04T00:00:00Z",
     '{"event": "Order Completed", "total": 100, "vip": "yes"}'),
    (5, "d1", "app", "aborted", 5, "u4", "m5", "http_404", "2026-11-05T12:00:00+02:00",
     '{"event": "it\'s", "total": -3, "items": []}'),
]
# Connections in the order they are made: a connection's slot is its number in its source.
CONNECTIONS = [("web", "d1"), ("app", "d2"), ("app", "d1"), ("api", "d3")]
SLOTS = {("web", "d1"): 1, ("app", "d2"): 1, ("app", "d1"): 2, ("api", "d3"): 1}
# Job label -> job id: event `label`, at its destination's connection.
JOB_IDS = {job[0]: job_id(job[0], SLOTS[job[2], job[1]]) for job in JOBS}
LABELS = {v: k for k, v in JOB_IDS.items()}


def _seed(conn: psycopg.Connection[Any]) -> None:
    """Two tenants (d3 and api belong to globex), three destinations, five jobs."""
    conn.execute("INSERT INTO tenants (id) VALUES ('acme'), ('globex')")
    conn.execute(
        "INSERT INTO sources (id, tenant_key) SELECT s, t.tenant_key FROM tenants t,"
        " (VALUES ('web', 'acme'), ('app', 'acme'), ('api', 'globex')) v(s, tenant)"
        " WHERE t.id = v.tenant")
    conn.execute(
        "INSERT INTO destinations (id, tenant_key, type, endpoint)"
        " SELECT d, t.tenant_key, 'webhook', 'http://127.0.0.1:9/' FROM tenants t,"
        " (VALUES ('d1', 'acme'), ('d2', 'acme'), ('d3', 'globex')) v(d, tenant)"
        " WHERE t.id = v.tenant")
    for source, destination in CONNECTIONS:
        conn.execute(
            "INSERT INTO connections (source_key, destination_key)"
            " SELECT s.source_key, d.destination_key FROM sources s, destinations d"
            " WHERE s.id = %s AND d.id = %s", (source, destination))
    for job in JOBS:
        label, destination, source, state, attempts, user, message, error, created, doc = job
        # Each event names its one destination: its source's other connections get nothing.
        conn.execute(
            """
            INSERT INTO events (event_id, created_at, source_key, tenant_key,
                                ordering_partition, user_id, message_id, destinations, document)
            SELECT %s, %s, s.source_key, s.tenant_key, %s, %s, %s,
                   ARRAY[(SELECT destination_key FROM destinations WHERE id = %s)], %s
            FROM sources s WHERE s.id = %s
            """,
            (label, created, partition_of(user, 64), user, message, destination, doc, source),
        )
        if state == "pending":
            continue  # above every cursor (the frontiers are 0)
        if state == "succeeded":
            # Its destination's cursor in the user's partition has passed it.
            conn.execute(
                "INSERT INTO destination_cursors (destination_key, partition, position)"
                " SELECT destination_key, %s, %s FROM destinations WHERE id = %s",
                (partition_of(user, 64), label, destination))
            continue
        conn.execute(
            """
            INSERT INTO jobs (job_id, destination_key, tenant_key, source_key,
                              ordering_partition, state, attempts, user_id, message_id,
                              error_code, created_at, updated_at)
            SELECT %s, d.destination_key, d.tenant_key, s.source_key, %s, %s, %s, %s, %s,
                   %s, %s, %s
            FROM destinations d, sources s WHERE d.id = %s AND s.id = %s
            """,
            (JOB_IDS[label], partition_of(user, 64), state, attempts, user, message, error,
             created, created, destination, source),
        )


@pytest.fixture
def jobs_db(database: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database, autocommit=True) as conn:
        _seed(conn)
        conn.execute("SET statement_timeout = '10s'")
        yield conn


# Every job as operators see it (jobsdb/sql/jobs.sql `view`: rows and the log), unnarrowed.
VIEW = sql.SQL(query("jobs.sql", "view")).format(
    rows=sql.SQL("true"), log=sql.SQL("true"), subscribed=sql.SQL("true"))


def select_ids(conn: psycopg.Connection[Any], compiled: Compiled | None) -> list[int]:
    if compiled is None:
        query_ = sql.SQL("SELECT j.job_id FROM {} j ORDER BY 1").format(VIEW)
        return [r[0] for r in conn.execute(query_)]
    # The way the admin service uses it: the fragment ANDed with more conditions.
    query_ = sql.SQL("SELECT j.job_id FROM {} j WHERE {} AND j.job_id > %(after)s ORDER BY 1"
                     ).format(VIEW, compiled.where)
    return [r[0] for r in conn.execute(query_, {**compiled.params, "after": 0})]


def test_the_seeded_jobs_are_what_operators_see(jobs_db: psycopg.Connection[Any]) -> None:
    """Rows and the log together: each seeded job once, in its state, and no other."""
    view = sql.SQL("SELECT j.job_id, j.state::text, j.attempts FROM {} j ORDER BY 1").format(VIEW)
    assert [(LABELS[r[0]], r[1], r[2]) for r in jobs_db.execute(view)] == [
        (job[0], job[3], job[4]) for job in JOBS]


SELECTIONS: list[tuple[str, list[int]]] = [
    ("destination = 'd1' AND state IN ('failed','waiting') AND attempts >= 3 "
     "AND payload.event = 'Order Completed' AND created_at > '2026-11-01'", [2]),
    ("", [1, 2, 3, 4, 5]),
    ("tenant = 'globex'", [4]),
    ("tenant != 'globex'", [1, 2, 3, 5]),
    ("source != 'web'", [3, 4, 5]),
    ("source IN ('app', 'api')", [3, 4, 5]),
    ("destination NOT IN ('d1', 'd2')", [4]),
    ("destination LIKE 'd%' AND destination NOT LIKE '%1'", [3, 4]),
    ("destination = 'nowhere'", []),
    ("destination > 'd1'", [3, 4]),
    ("state != 'pending'", [2, 3, 4, 5]),
    ("state NOT IN ('pending', 'aborted')", [2, 3, 4]),
    (f"job_id IN ({JOB_IDS[1]}, {JOB_IDS[3]}, 99)", [1, 3]),
    (f"job_id NOT IN ({JOB_IDS[1]}, {JOB_IDS[3]})", [2, 4, 5]),
    ("attempts >= 4 OR attempts < 1", [1, 3, 5]),
    ("user_id = 'u1'", [1, 3]),
    ("user_id LIKE 'u_' AND message_id NOT LIKE 'm_'", []),
    ("message_id <= 'm2'", [1, 2]),
    # SQL's three-valued logic: a null error_code is neither = nor != anything.
    ("error_code IS NULL", [1, 3, 4]),
    ("error_code IS NOT NULL", [2, 5]),
    ("error_code != 'timeout'", [5]),
    ("NOT error_code = 'timeout'", [5]),
    ("error_code LIKE 'http\\_%'", [5]),
    # Dates without a zone are UTC; 2026-11-05T12:00+02:00 is 10:00 UTC.
    ("created_at >= '2026-11-05T10:00:00Z'", [5]),
    ("created_at > '2026-11-05T10:00:00'", []),
    ("created_at = '2026-11-05 11:00:00+01:00'", [5]),
    ("created_at < '2026-11-02'", [1]),
    ("created_at IN ('2026-11-02', '2026-11-03')", [2, 3]),
    ("updated_at < '2100-01-01'", [1, 2, 3, 4, 5]),
    # payload: a number compares numerically, and only with JSON numbers ("10" is a string).
    ("payload.total > 9", [1, 2, 4]),
    ("payload.total = 10.0", [1]),
    ("payload.total != 10", [2, 4, 5]),
    ("payload.total IN (-3, 100)", [4, 5]),
    ("payload.total NOT IN (-3, 100)", [1, 2]),
    # ... a string compares the text form, so '10' matches both 10 and "10".
    ("payload.total = '10'", [1, 3]),
    ("payload.event = 'it''s'", [5]),
    ("payload.event LIKE 'Order%'", [1, 2, 4]),
    ("payload.event IN ('Signed Up', 'it''s')", [3, 5]),
    ("NOT payload.event = 'Order Completed'", [3, 5]),
    # ... TRUE/FALSE only match JSON booleans ("yes" is neither).
    ("payload.vip = TRUE", [1]),
    ("payload.vip != TRUE", [3]),
    ("payload.vip IN (true, false)", [1, 3]),
    # IS NULL: the key is missing or JSON null.
    ("payload.tags IS NULL", [1, 2, 3, 4, 5]),
    ("payload.items IS NOT NULL", [1, 5]),
    ("payload.items.0.sku = 'a'", [1]),
    ("payload.items.0 IS NULL", [2, 3, 4, 5]),
    ('payload."a b"."c.d" = 1', [3]),
    ("payload.event.deeper = 'x'", []),
    ("user_id = 'u1' OR attempts > 4 AND tenant = 'acme'", [1, 3, 5]),
    ("(user_id = 'u1' OR attempts > 4) AND state = 'waiting'", [3]),
    ("NOT (user_id = 'u1' OR user_id = 'u2')", [4, 5]),
]


def test_filters_select_exactly_the_expected_jobs(jobs_db: psycopg.Connection[Any]) -> None:
    got = {text: [LABELS[j] for j in select_ids(jobs_db, compile_filter(text))]
           for text, _ in SELECTIONS}
    assert got == dict(SELECTIONS)


# ---------------------------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------------------------

_NOISE = [
    "AND", "or", "NOT", "IN", "is", "NULL", "LIKE", "TRUE", "(", ")", ",", ".", "=", "!=", "<>",
    "<", ">=", "'", "''", '"', "-", "-1", "1.5", "3", ";", "\\", "%", "%s", "$1", "/*", "--",
    *filters.FIELDS, "payload.x", "'failed'", "'2026-11-01'", "é", "\x00",
]
_SOUP = st.lists(st.sampled_from(_NOISE) | st.text(max_size=4), max_size=30).map(" ".join)


def _placeholders_match(compiled: Compiled, conn: psycopg.Connection[Any]) -> str:
    text = compiled.where.as_string(conn)
    # Every value is a parameter: each named once (a payload path may be read twice), and no
    # other % in the text at all.
    named = set(re.findall(r"%\(([a-z0-9]+)\)s", text))
    assert named == set(compiled.params)
    assert "%" not in re.sub(r"%\([a-z0-9]+\)s", "", text)
    return text


# Every literal the generator writes carries this marker, so it is easy to see that none of
# them ever reaches the SQL text.
MARK = "Zq7"
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
_strings = st.text(_chars, max_size=12).map(lambda t: MARK + t)


def _quote(text: str, quote: str = "'") -> str:
    return quote + text.replace(quote, quote * 2) + quote


def _like_pattern(text: str) -> str:
    trailing = len(text) - len(text.rstrip("\\"))
    return text + "x" if trailing % 2 else text


_COMPARE = st.sampled_from(["=", "!=", "<>", "<", "<=", ">", ">="])
_EQUALITY = st.sampled_from(["=", "!=", "<>"])
_ZONES = st.sampled_from(["", "Z", "+05:30", "-11:00", "+00:00"])
_timestamps = st.builds(lambda d, z: _quote(d.isoformat() + z), st.datetimes(), _ZONES) | (
    st.dates().map(lambda d: _quote(d.isoformat())))
_numbers = st.integers(-(10**30), 10**30).map(str) | st.builds(
    lambda a, b: f"{a}.{b}", st.integers(-(10**9), 10**9), st.integers(0, 10**6))


def _in(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda neg, vs: ("NOT IN" if neg else "IN") + " (" + ", ".join(vs) + ")",
                     st.booleans(), st.lists(values, min_size=1, max_size=4))


def _like() -> st.SearchStrategy[str]:
    return st.builds(lambda neg, p: ("NOT LIKE " if neg else "LIKE ") + _quote(_like_pattern(p)),
                     st.booleans(), _strings)


def _predicate(names: list[str], condition: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda name, cond: f"{name} {cond}", st.sampled_from(names), condition)


_quoted_strings = _strings.map(_quote)
_bounded_ints = st.integers(-(2**31), 2**31 - 1).map(str)
_path = st.lists(st.sampled_from(["event", "0", "items", "And"]) | _strings.map(
    lambda k: _quote(k, '"')), min_size=1, max_size=3).map(lambda keys: "payload." + ".".join(keys))
_is_null = st.sampled_from(["IS NULL", "IS NOT NULL"])

PREDICATES: st.SearchStrategy[str] = st.one_of(
    _predicate(["tenant", "source", "destination", "user_id", "message_id", "error_code"],
               st.builds("{} {}".format, _COMPARE, _quoted_strings) | _in(_quoted_strings)
               | _like()),
    _predicate(["error_code"], _is_null),
    _predicate(["state"], st.builds("{} {}".format, _EQUALITY, st.sampled_from(
        [_quote(s) for s in filters.STATES])) | _in(st.sampled_from(
            [_quote(s) for s in filters.STATES]))),
    _predicate(["job_id", "attempts"],
               st.builds("{} {}".format, _COMPARE, _bounded_ints) | _in(_bounded_ints)),
    _predicate(["created_at", "updated_at"],
               st.builds("{} {}".format, _COMPARE, _timestamps) | _in(_timestamps)),
    st.builds("{} {}".format, _path, st.one_of(
        st.builds("{} {}".format, _COMPARE, _quoted_strings | _numbers),
        st.builds("{} {}".format, _EQUALITY, st.sampled_from(["TRUE", "false"])),
        _in(_quoted_strings), _in(_numbers), _in(st.sampled_from(["TRUE", "FALSE"])),
        _like(), _is_null)),
)


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> str:
    shape = draw(st.sampled_from(["leaf", "leaf", "and", "or", "not", "parens"]))
    if depth >= 5 or shape == "leaf":
        return draw(PREDICATES)
    if shape == "not":
        return "NOT " + draw(expressions(depth + 1))
    if shape == "parens":
        return "(" + draw(expressions(depth + 1)) + ")"
    joiner = " AND " if shape == "and" else " OR "
    return draw(expressions(depth + 1)) + joiner + draw(expressions(depth + 1))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=expressions())
def test_generated_filters_run_in_postgres_with_every_value_a_parameter(
    jobs_db: psycopg.Connection[Any], text: str
) -> None:
    compiled = compile_filter(text)
    assert compiled is not None
    sql_text = _placeholders_match(compiled, jobs_db)
    assert MARK not in sql_text
    select_ids(jobs_db, compiled)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    """A valid filter with one edit: near misses reach deeper into the parser and compiler
    than random text, and an edit inside a string literal still compiles and runs."""
    text = draw(expressions())
    at = draw(st.integers(0, len(text)))
    edit = draw(st.sampled_from(["insert", "delete", "cut"]))
    if edit == "insert":
        return text[:at] + draw(st.sampled_from(_NOISE) | st.text(max_size=2)) + text[at:]
    if edit == "delete":
        return text[:at] + text[at + 1:]
    return text[:at]


@settings(max_examples=500, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text() | _SOUP | _mutated())
def test_any_text_compiles_or_raises_filter_error(
    jobs_db: psycopg.Connection[Any], text: str
) -> None:
    error: FilterError | None = None
    try:
        compiled = compile_filter(text)
    except FilterError as caught:
        error = caught
    if error is not None:
        assert 1 <= error.position <= max(len(text) + 1, MAX_LENGTH + 1)
        assert error.message.startswith(f"column {error.position}: expected ")
        return
    if compiled is not None:
        _placeholders_match(compiled, jobs_db)
    select_ids(jobs_db, compiled)
