"""The filter language's parser: recursive descent over the tokens, one method per grammar rule
(the grammar is in filterlang/__init__.py), for the fields of one Language."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final, NoReturn, cast

from filterlang.errors import FilterError
from filterlang.lexer import Token, tokenize
from filterlang.nodes import (
    And,
    Compare,
    CompareOp,
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

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 32
MAX_IN_VALUES: Final = 1000

_OPERATOR_EXPECTED: Final = (
    "an operator (=, !=, <, <=, >, >=, IN, NOT IN, LIKE, NOT LIKE, IS NULL, IS NOT NULL)"
)
_VALUE_EXPECTED: Final = "a value (a quoted string, a number, TRUE or FALSE)"


@dataclass(frozen=True)
class Language:
    """The fields one use of the filter language knows: the grammar is shared, the fields are
    not (jobs in jobsdb.filters; events, for connection filters, in filterlang.events)."""

    # Fields that stand alone (user_id).
    fields: frozenset[str]
    # Fields followed by a path into a JSON document (payload.<key>.<key>).
    documents: frozenset[str]
    # What an unknown field is told it should have been.
    expected: str


def is_empty(text: str) -> bool:
    """An empty (or blank) filter means "everything"; a filter too long to parse is not empty,
    so it still reaches parse() and is refused there for its length."""
    return len(text) <= MAX_LENGTH and not text.strip()


def parse(text: str, language: Language) -> Node:
    """Parse a filter into its AST. An empty filter is an error here (see is_empty)."""
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
