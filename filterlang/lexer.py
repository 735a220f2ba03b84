"""The filter language's tokens: text in, a list of tokens out, always ending with "end"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, cast

from filterlang.errors import FilterError

_KEYWORDS: Final = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"})

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
