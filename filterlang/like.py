"""SQL LIKE as a function of the text, without backtracking.

`%` any run of characters, `_` one character, `\\` makes the next one literal: Postgres's
LIKE with its default escape, matched at most in the text's length times the pattern's.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def like_matcher(pattern: str) -> Callable[[str], bool]:
    """A LIKE pattern as a function of the text.

    The pattern is split at each unescaped %; every piece between them is a fixed number of
    characters (literals and _). The first piece must match at the start, the last at the end,
    and each middle one is taken at its leftmost match after the previous one: with only %
    between fixed-length pieces, the leftmost choice never loses a match, so nothing is ever
    retried. A regular expression of `.*` runs could backtrack for a very long time on a
    pattern like '%a%a%a%a%b', and a tenant's filter must not be able to stall ingest.
    """
    pieces: list[list[str]] = [[]]
    escaped = False
    for ch in pattern:
        if escaped:
            pieces[-1].append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "%":
            pieces.append([])
        elif ch == "_":
            pieces[-1].append(".")
        else:
            pieces[-1].append(re.escape(ch))
    compiled = [(re.compile("".join(p), re.DOTALL), len(p)) for p in pieces]
    if len(compiled) == 1:
        exact = compiled[0][0]
        return lambda text: exact.fullmatch(text) is not None
    (first, first_length), middle, (last, last_length) = compiled[0], compiled[1:-1], compiled[-1]

    def like(text: str) -> bool:
        end = len(text) - last_length
        if end < first_length or first.match(text) is None or last.match(text, end) is None:
            return False
        position = first_length
        for piece, length in middle:
            if length == 0:
                continue
            found = piece.search(text, position, end)
            if found is None:
                return False
            position = found.end()
        return True

    return like
