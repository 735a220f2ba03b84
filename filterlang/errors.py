"""FilterError, and the rejections of meaning that every compiler of the language shares, so
a filter refused by the SQL compiler and by the event evaluator reads the same message."""

from __future__ import annotations

from typing import NoReturn

from filterlang.nodes import Predicate, Value, field_name, operator_name


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


def reject_value(value: Value, expected: str) -> NoReturn:
    raise FilterError(value.position, expected, value.text if value.kind == "string"
                      else f"'{value.text}'")


def reject_null(value: Value) -> None:
    """NULL is no value to compare with: `x = NULL` is never true in SQL, so say IS NULL."""
    if value.kind == "null":
        reject_value(value, "a value (use IS NULL or IS NOT NULL to test for null)")


def reject_operator(node: Predicate, allowed: str, note: str = "") -> NoReturn:
    raise FilterError(node.position, f"an operator for {field_name(node.field)} ({allowed}){note}",
                      f"'{operator_name(node)}'")

