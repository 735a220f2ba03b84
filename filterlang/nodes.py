"""The filter language's tree. Positions are kept for error messages but left out of equality,
so tests can write the expected tree without counting columns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, TypeAlias

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

# Operators that order values: refused where the values have no order (states, booleans).
ORDERING = ("<", "<=", ">", ">=")


def field_name(subject: Field) -> str:
    """The field as the operator typed it, path included (payload.items.0.sku)."""
    return ".".join((subject.name, *subject.path))


def operator_name(node: Predicate) -> str:
    """The predicate's operator as the operator typed it, for error messages."""
    if isinstance(node, Compare):
        return node.op
    prefix = "NOT " if node.negated else ""
    if isinstance(node, InList):
        return prefix + "IN"
    if isinstance(node, Like):
        return prefix + "LIKE"
    return "IS NOT NULL" if node.negated else "IS NULL"
