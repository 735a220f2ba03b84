"""The admin filter language: text -> tokens -> AST -> a parameterised WHERE fragment on `jobs j`.

    destination = 'd1' AND state IN ('failed','waiting') AND attempts >= 3
        AND payload.event = 'Order Completed' AND created_at > '2026-11-01'

Grammar (keywords are case-insensitive, so are field names; payload keys are not):

    filter     := or END
    or         := and ("OR" and)*
    and        := not ("AND" not)*
    not        := "NOT" not | "(" or ")" | predicate
    predicate  := field ( compare value | ["NOT"] "IN" "(" value ("," value)* ")"
                        | ["NOT"] "LIKE" string | "IS" ["NOT"] "NULL" )
    field      := name | "payload" ("." key)+          key := name | digits | "quoted key"
    compare    := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    value      := 'string' | number | TRUE | FALSE | NULL     ('' inside a string is a quote)

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
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Literal, LiteralString, NoReturn, TypeAlias, cast

from psycopg import sql

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 32
MAX_IN_VALUES: Final = 1000

# The job_state enum of jobsdb/migrations/0001_initial.sql, in its order.
STATES: Final = ("pending", "failed", "waiting", "succeeded", "aborted")

FIELDS: Final = (
    "job_id", "tenant", "source", "destination", "user_id", "message_id", "state", "attempts",
    "error_code", "created_at", "updated_at", "payload",
)

_KEYWORDS: Final = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"})
_OPERATOR_EXPECTED: Final = (
    "an operator (=, !=, <, <=, >, >=, IN, NOT IN, LIKE, NOT LIKE, IS NULL, IS NOT NULL)"
)
_VALUE_EXPECTED: Final = "a value (a quoted string, a number, TRUE or FALSE)"


@dataclass(frozen=True)
class Language:
    """The fields one use of the filter language knows: the grammar is shared, the fields are
    not (jobs here; events, for connection filters, in jobsdb.event_filters)."""

    # Fields that stand alone (user_id).
    fields: frozenset[str]
    # Fields followed by a path into a JSON document (payload.<key>.<key>).
    documents: frozenset[str]
    # What an unknown field is told it should have been.
    expected: str


JOBS: Final = Language(
    fields=frozenset(FIELDS) - {"payload"},
    documents=frozenset({"payload"}),
    expected="a field (job_id, tenant, source, destination, user_id, message_id, state, "
             "attempts, error_code, created_at, updated_at or payload.<key>)",
)


class FilterError(ValueError):
    """A filter the language rejects, with where (1-based column) and what was expected there.

    One type for every rejection, syntax or meaning, so the caller maps exactly one exception
    to INVALID_ARGUMENT and the operator always gets a column to look at.
    """

    def __init__(self, position: int, expected: str, found: str) -> None:
        self.position = position
        self.expected = expected
        self.found = found
        self.message = f"column {position}: expected {expected}, found {found}"
        super().__init__(self.message)


# ---------------------------------------------------------------------------------------------
# The AST. Positions are kept for error messages but left out of equality, so tests can write
# the expected tree without counting columns.
# ---------------------------------------------------------------------------------------------

ValueKind: TypeAlias = Literal["string", "number", "boolean", "null"]
CompareOp: TypeAlias = Literal["=", "!=", "<", "<=", ">", ">="]


@dataclass(frozen=True)
class Field:
    name: str
    path: tuple[str, ...] = ()
    position: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True)
class Value:
    kind: ValueKind
    value: str | int | Decimal | bool | None
    position: int = dataclasses.field(default=0, compare=False)
    text: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class Compare:
    field: Field
    op: CompareOp
    value: Value
    position: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True)
class InList:
    field: Field
    values: tuple[Value, ...]
    negated: bool = False
    position: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True)
class Like:
    field: Field
    pattern: Value
    negated: bool = False
    position: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True)
class IsNull:
    field: Field
    negated: bool = False
    position: int = dataclasses.field(default=0, compare=False)


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Predicate: TypeAlias = Compare | InList | Like | IsNull
Node: TypeAlias = Predicate | Not | And | Or


# ---------------------------------------------------------------------------------------------
# Tokens.
# ---------------------------------------------------------------------------------------------

TokenKind: TypeAlias = Literal[
    "word", "quoted", "string", "number", "op", "(", ")", ",", ".", "bad", "end"]

_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
# Longest first, so "<=" is never read as "<" then "=".
_OPERATORS: Final = ("<=", ">=", "<>", "!=", "=", "<", ">")
_DIGITS: Final = "0123456789"


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    text: str  # as typed, quotes included
    value: str  # a string's or quoted key's content; an operator in canonical form
    position: int

    @property
    def keyword(self) -> str | None:
        # ASCII only: "\u0131n".upper() is "IN", and a dotless i should not make a keyword.
        upper = self.text.upper()
        return upper if self.kind == "word" and self.text.isascii() and upper in _KEYWORDS else None

    def describe(self) -> str:
        if self.kind == "end":
            return "end of filter"
        text = self.text if len(self.text) <= 40 else self.text[:39] + "…"
        if self.kind in ("string", "quoted"):
            return text if text.isprintable() else ascii(text)
        return f"'{text}'" if text.isprintable() else ascii(text)


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def tokenize(text: str) -> list[Token]:
    """Split the filter into tokens, always ending with an "end" token.

    Characters that start no token become "bad" tokens instead of errors here: the parser
    then rejects them with what it expected at that point, which is the more useful message.
    Only strings that never close (or hold what Postgres cannot store) fail in the tokenizer.
    """
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch, start = text[i], i
        after_dot = bool(tokens) and tokens[-1].kind == "."
        if ch.isspace():
            i += 1
            continue
        if ch in "'\"":
            value, i = _quoted(text, i)
            kind: TokenKind = "string" if ch == "'" else "quoted"
            tokens.append(Token(kind, text[start:i], value, start + 1))
            continue
        if ch in "(),.":
            i += 1
            tokens.append(Token(cast(TokenKind, ch), ch, ch, start + 1))
            continue
        if after_dot and _is_word_char(ch):
            # A key after '.': digits are a key too (an array index), not a number.
            while i < n and _is_word_char(text[i]):
                i += 1
            tokens.append(Token("word", text[start:i], text[start:i], start + 1))
            continue
        if ch in _DIGITS or (ch == "-" and i + 1 < n and text[i + 1] in _DIGITS):
            # Read the whole run, so "1.2.3" or "3abc" is reported as one bad token.
            i += 1
            while i < n and (_is_word_char(text[i]) or text[i] == "."):
                i += 1
            word = text[start:i]
            tokens.append(Token("number" if _NUMBER.fullmatch(word) else "bad", word, word,
                                start + 1))
            continue
        if ch.isalpha() or ch == "_":
            while i < n and _is_word_char(text[i]):
                i += 1
            tokens.append(Token("word", text[start:i], text[start:i], start + 1))
            continue
        op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
        if op is not None:
            i += len(op)
            tokens.append(Token("op", op, "!=" if op == "<>" else op, start + 1))
            continue
        i += 1
        tokens.append(Token("bad", ch, ch, start + 1))
    tokens.append(Token("end", "", "", n + 1))
    return tokens


def _quoted(text: str, start: int) -> tuple[str, int]:
    """Read a 'string' or "quoted key" starting at text[start]; a doubled quote is one quote."""
    quote = text[start]
    parts: list[str] = []
    i = start + 1
    while True:
        j = text.find(quote, i)
        if j < 0:
            what = "string" if quote == "'" else "quoted key"
            raise FilterError(start + 1, f"a closing {quote} for the {what} that starts here",
                              "end of filter")
        parts.append(text[i:j])
        if text.startswith(quote, j + 1):
            parts.append(quote)
            i = j + 2
            continue
        break
    for offset, ch in enumerate(text[start:j], start=start):
        # Postgres text cannot hold NUL, and a lone surrogate cannot be encoded as UTF-8:
        # either would fail in the driver, so reject them here, where we can point at them.
        if ch == "\x00":
            raise FilterError(offset + 1, "a character other than NUL", "NUL")
        if "\ud800" <= ch <= "\udfff":
            raise FilterError(offset + 1, "valid Unicode text", "a lone surrogate")
    return "".join(parts), j + 1


# ---------------------------------------------------------------------------------------------
# The parser: recursive descent, one method per grammar rule.
# ---------------------------------------------------------------------------------------------


def parse(text: str, language: Language = JOBS) -> Node:
    """Parse a filter into its AST. An empty filter is an error here (compile_filter allows it)."""
    if len(text) > MAX_LENGTH:
        raise FilterError(MAX_LENGTH + 1, f"a filter of at most {MAX_LENGTH} characters",
                          f"{len(text)} characters")
    return _Parser(tokenize(text), language).filter()


class _Parser:
    def __init__(self, tokens: list[Token], language: Language) -> None:
        self.tokens = tokens
        self.language = language
        self.index = 0
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def fail(self, expected: str) -> NoReturn:
        token = self.peek()
        raise FilterError(token.position, expected, token.describe())

    def nest(self) -> None:
        # Counting NOT as well as '(' bounds the recursion, so no input reaches RecursionError.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"at most {MAX_DEPTH} levels of nested parentheses and NOT")

    def filter(self) -> Node:
        node = self.or_()
        if self.peek().kind != "end":
            self.fail("AND, OR or end of filter")
        return node

    def or_(self) -> Node:
        operands = [self.and_()]
        while self.peek().keyword == "OR":
            self.advance()
            operands.append(self.and_())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_(self) -> Node:
        operands = [self.not_()]
        while self.peek().keyword == "AND":
            self.advance()
            operands.append(self.not_())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_(self) -> Node:
        token = self.peek()
        if token.keyword == "NOT":
            self.nest()
            self.advance()
            node: Node = Not(self.not_())
            self.depth -= 1
            return node
        if token.kind == "(":
            self.nest()
            self.advance()
            node = self.or_()
            if self.peek().kind != ")":
                self.fail("AND, OR or ')'")
            self.advance()
            self.depth -= 1
            return node
        return self.predicate()

    def predicate(self) -> Predicate:
        subject = self.field()
        token = self.peek()
        if token.kind == "op":
            self.advance()
            op = cast(CompareOp, token.value)
            return Compare(subject, op, self.value(), token.position)
        negated = False
        if token.keyword == "NOT":
            self.advance()
            negated = True
            if self.peek().keyword not in ("IN", "LIKE"):
                self.fail("IN or LIKE after NOT")
        keyword = self.advance().keyword if self.peek().keyword in ("IN", "LIKE", "IS") else None
        if keyword == "IN":
            return InList(subject, self.values(), negated, token.position)
        if keyword == "LIKE":
            return Like(subject, self.pattern(), negated, token.position)
        if keyword == "IS":
            if self.peek().keyword == "NOT":
                self.advance()
                negated = True
                if self.peek().keyword != "NULL":
                    self.fail("NULL after IS NOT")
            if self.peek().keyword != "NULL":
                self.fail("NULL or NOT NULL after IS")
            self.advance()
            return IsNull(subject, negated, token.position)
        self.fail(_OPERATOR_EXPECTED)

    def field(self) -> Field:
        token = self.peek()
        name = token.text.lower()
        if token.kind != "word":
            self.fail("a field, NOT or '('")
        language = self.language
        if (token.keyword is not None or not token.text.isascii()
                or (name not in language.fields and name not in language.documents)):
            self.fail(language.expected)
        self.advance()
        if name not in language.documents:
            return Field(name, (), token.position)
        if self.peek().kind != ".":
            self.fail(f"'.' and a key after {name} ({name}.<key>)")
        path: list[str] = []
        while self.peek().kind == ".":
            self.advance()
            key = self.peek()
            if key.kind not in ("word", "quoted"):
                self.fail("a key after '.' (a name, digits or a \"quoted key\")")
            self.advance()
            path.append(key.value)
        return Field(name, tuple(path), token.position)

    def value(self) -> Value:
        token = self.peek()
        if token.kind == "string":
            value = Value("string", token.value, token.position, token.text)
        elif token.kind == "number":
            number: int | Decimal = (
                Decimal(token.text) if "." in token.text else int(token.text))
            value = Value("number", number, token.position, token.text)
        elif token.keyword in ("TRUE", "FALSE"):
            value = Value("boolean", token.keyword == "TRUE", token.position, token.text)
        elif token.keyword == "NULL":
            value = Value("null", None, token.position, token.text)
        else:
            self.fail(_VALUE_EXPECTED)
        self.advance()
        return value

    def values(self) -> tuple[Value, ...]:
        if self.peek().kind != "(":
            self.fail("'(' after IN")
        self.advance()
        values = [self.value()]
        while self.peek().kind == ",":
            self.advance()
            if len(values) == MAX_IN_VALUES:
                self.fail(f"at most {MAX_IN_VALUES} values in an IN list")
            values.append(self.value())
        if self.peek().kind != ")":
            self.fail("',' or ')'")
        self.advance()
        return tuple(values)

    def pattern(self) -> Value:
        token = self.peek()
        if token.kind != "string":
            self.fail("a quoted pattern after LIKE")
        trailing = len(token.value) - len(token.value.rstrip("\\"))
        if trailing % 2:
            # Postgres refuses a pattern that ends in its escape character; say so up front.
            self.fail("a pattern that does not end in a lone \\ (\\ escapes the next character)")
        self.advance()
        return Value("string", token.value, token.position, token.text)


# ---------------------------------------------------------------------------------------------
# The compiler.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A WHERE fragment on `jobs j` with positional %s placeholders, and their values in order."""

    where: sql.Composed
    params: list[Any]
    # The parsed filter (None: every job).
    node: Node | None = None


def compile_filter(text: str) -> Compiled | None:
    """Compile a filter; None for an empty one, which means every job (omit the WHERE part)."""
    if len(text) <= MAX_LENGTH and not text.strip():
        return None
    node = parse(text)
    params: list[Any] = []
    where = _node(node, params)
    return Compiled(sql.Composed([where]), params, node)


ColumnKind: TypeAlias = Literal["key", "state", "integer", "text", "timestamp"]


@dataclass(frozen=True)
class _Column:
    kind: ColumnKind
    column: LiteralString
    param: LiteralString = "%s::text"
    array: LiteralString = "%s::text[]"
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
    "job_id": _Column("integer", "j.job_id", "%s::bigint", "%s::bigint[]", bounds=_INT64),
    "attempts": _Column("integer", "j.attempts", "%s::integer", "%s::integer[]", bounds=_INT32),
    "tenant": _Column("key", "j.tenant_key", lookup="SELECT tenant_key FROM tenants"),
    "source": _Column("key", "j.source_key", lookup="SELECT source_key FROM sources"),
    "destination": _Column(
        "key", "j.destination_key", lookup="SELECT destination_key FROM destinations"),
    "user_id": _Column("text", "j.user_id"),
    "message_id": _Column("text", "j.message_id"),
    "error_code": _Column("text", "j.error_code", nullable=True),
    "state": _Column("state", "j.state", "%s::job_state", "%s::job_state[]"),
    "created_at": _Column("timestamp", "j.created_at", "%s::timestamptz", "%s::timestamptz[]"),
    "updated_at": _Column("timestamp", "j.updated_at", "%s::timestamptz", "%s::timestamptz[]"),
}

_ORDERING: Final = ("<", "<=", ">", ">=")
_ALL_OPERATORS: Final = "=, !=, <, <=, >, >=, IN, NOT IN, LIKE, NOT LIKE"
# Which operators make sense for each kind of column (IS NULL only where a column can be null).
_ALLOWED: Final[dict[ColumnKind, str]] = {
    "key": _ALL_OPERATORS,
    "text": _ALL_OPERATORS,
    "state": "=, !=, IN, NOT IN",
    "integer": "=, !=, <, <=, >, >=, IN, NOT IN",
    "timestamp": "=, !=, <, <=, >, >=, IN, NOT IN",
}


def compile_node(node: Node, params: list[Any]) -> sql.Composable:
    """A parsed filter (of the jobs language) as a WHERE fragment on `j`, its values appended
    to `params` in order."""
    return _node(node, params)


def _node(node: Node, params: list[Any]) -> sql.Composable:
    # Every composite is parenthesised, so the fragment can be ANDed into any WHERE as is.
    if isinstance(node, Or):
        return sql.SQL("({})").format(sql.SQL(" OR ").join(_node(n, params) for n in node.operands))
    if isinstance(node, And):
        return sql.SQL("({})").format(
            sql.SQL(" AND ").join(_node(n, params) for n in node.operands))
    if isinstance(node, Not):
        return sql.SQL("(NOT {})").format(_node(node.operand, params))
    if node.field.name == "payload":
        return _payload(node, params)
    return _column(node, _COLUMNS[node.field.name], params)


def _operator_name(node: Predicate) -> str:
    if isinstance(node, Compare):
        return node.op
    prefix = "NOT " if node.negated else ""
    if isinstance(node, InList):
        return prefix + "IN"
    if isinstance(node, Like):
        return prefix + "LIKE"
    return "IS NOT NULL" if node.negated else "IS NULL"


def _reject_operator(node: Predicate, allowed: str, note: str = "") -> NoReturn:
    raise FilterError(node.position, f"an operator for {_field_name(node.field)} ({allowed}){note}",
                      f"'{_operator_name(node)}'")


def _field_name(subject: Field) -> str:
    return ".".join((subject.name, *subject.path))


def _reject_value(value: Value, expected: str) -> NoReturn:
    raise FilterError(value.position, expected, value.text if value.kind == "string"
                      else f"'{value.text}'")


def _column(node: Predicate, column: _Column, params: list[Any]) -> sql.Composable:
    allowed = _ALLOWED[column.kind] + (", IS NULL, IS NOT NULL" if column.nullable else "")
    name = node.field.name
    if isinstance(node, IsNull):
        if not column.nullable:
            _reject_operator(node, allowed, f"; {name} is never null")
        # Only nullable text columns get here.
        return sql.SQL("{} {}").format(
            sql.SQL(column.column), sql.SQL("IS NOT NULL" if node.negated else "IS NULL"))
    if isinstance(node, Like) and column.kind not in ("key", "text"):
        _reject_operator(node, allowed)
    if isinstance(node, Compare) and node.op in _ORDERING and column.kind == "state":
        _reject_operator(node, allowed)
    convert = _converter(name, column)
    target = sql.SQL("id") if column.kind == "key" else sql.SQL(column.column)
    condition = _condition(target, node, convert, column.param, column.array, params)
    if column.kind == "key":
        # `id != 'd1'` inside the lookup is the same set as outside it (every job's key names a
        # row and ids are unique), so one shape serves every operator.
        return sql.SQL("{} IN ({} WHERE {})").format(
            sql.SQL(column.column), sql.SQL(column.lookup), condition)
    return condition


def _condition(target: sql.Composable, node: Compare | InList | Like,
               convert: Callable[[Value], Any], param: LiteralString, array: LiteralString,
               params: list[Any]) -> sql.Composable:
    """`target <op> %s` for one predicate, appending the converted value(s) to params."""
    if isinstance(node, Compare):
        params.append(convert(node.value))
        return sql.SQL("{} {} {}").format(target, sql.SQL(node.op), sql.SQL(param))
    if isinstance(node, InList):
        # One array parameter instead of n placeholders: the statement text is the same for
        # every list length, which keeps pg_stat_statements and prepared plans to one entry.
        params.append([convert(v) for v in node.values])
        shape = "{} <> ALL({})" if node.negated else "{} = ANY({})"
        return sql.SQL(shape).format(target, sql.SQL(array))
    params.append(convert(node.pattern))
    return sql.SQL("{} {} {}").format(
        target, sql.SQL("NOT LIKE" if node.negated else "LIKE"), sql.SQL(param))


def _reject_null(value: Value) -> None:
    if value.kind == "null":
        _reject_value(value, "a value (use IS NULL or IS NOT NULL to test for null)")


def _converter(name: str, column: _Column) -> Callable[[Value], Any]:
    """The check and conversion of one literal for a column: Postgres only sees valid values."""

    def convert(value: Value) -> Any:
        _reject_null(value)
        if column.kind == "integer":
            low, high = column.bounds
            if value.kind != "number" or not isinstance(value.value, int):
                _reject_value(value, f"an integer for {name}")
            if not low <= value.value <= high:
                _reject_value(value, f"an integer for {name} between {low} and {high}")
            return value.value
        if value.kind != "string":
            hint = " (a date or time, quoted)" if column.kind == "timestamp" else ""
            _reject_value(value, f"a quoted string for {name}{hint}")
        assert isinstance(value.value, str)
        if column.kind == "state" and value.value not in STATES:
            _reject_value(value, "a job state (" + ", ".join(f"'{s}'" for s in STATES) + ")")
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
        _reject_value(value, f"a date or time for {name} in ISO 8601, like '2026-11-01' or "
                             "'2026-11-01T12:00:00Z'")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# payload expressions. The path is a text[] parameter; a number or boolean is compared only
# when the value at the path has that JSON type (CASE guarantees the cast never sees another).
_PAYLOAD_TEXT: Final = "(j.payload #>> %s::text[])"
_PAYLOAD_NUMBER: Final = (
    "(CASE WHEN jsonb_typeof(j.payload #> %s::text[]) = 'number' "
    "THEN (j.payload #> %s::text[])::numeric END)")
_PAYLOAD_BOOLEAN: Final = (
    "(CASE WHEN jsonb_typeof(j.payload #> %s::text[]) = 'boolean' "
    "THEN (j.payload #> %s::text[])::boolean END)")


def _payload(node: Predicate, params: list[Any]) -> sql.Composable:
    path = list(node.field.path)
    if isinstance(node, IsNull):
        # #>> yields SQL NULL both for a missing key and for JSON null.
        params.append(path)
        return sql.SQL("{} {}").format(
            sql.SQL(_PAYLOAD_TEXT), sql.SQL("IS NOT NULL" if node.negated else "IS NULL"))
    if isinstance(node, Like):
        params.append(path)
        return _condition(sql.SQL(_PAYLOAD_TEXT), node, _text, "%s::text", "%s::text[]", params)
    values = node.values if isinstance(node, InList) else (node.value,)
    kind = values[0].kind
    for value in values:
        _reject_null(value)
        if value.kind != kind:
            _reject_value(value, f"a {kind} like the first value (the values of an IN list on "
                                 "payload share one JSON type)")
    if kind == "string":
        params.append(path)
        return _condition(sql.SQL(_PAYLOAD_TEXT), node, _text, "%s::text", "%s::text[]", params)
    if kind == "number":
        params.extend((path, path))
        return _condition(sql.SQL(_PAYLOAD_NUMBER), node, _number, "%s::numeric",
                          "%s::numeric[]", params)
    if isinstance(node, Compare) and node.op in _ORDERING:
        _reject_operator(node, "=, !=, IN, NOT IN", " to compare with TRUE or FALSE")
    params.extend((path, path))
    return _condition(sql.SQL(_PAYLOAD_BOOLEAN), node, _boolean, "%s::boolean",
                      "%s::boolean[]", params)


def _text(value: Value) -> str:
    assert isinstance(value.value, str)
    return value.value


def _number(value: Value) -> Decimal:
    assert isinstance(value.value, int | Decimal)
    return Decimal(value.value)


def _boolean(value: Value) -> bool:
    assert isinstance(value.value, bool)
    return value.value
