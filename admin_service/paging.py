"""The one paging helper of the List calls: a page size and token read from the request, and
the token of the page after.

Pages are keyset pages: the token names the last key of the page before, so a page stays
stable while rows are added. Tokens are opaque to callers (they may change shape); inside, the
kind of list and the last key seen, so a token of one list is refused by another.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from admin_service import validate

DEFAULT_PAGE = 100

Row = TypeVar("Row")


@dataclass(frozen=True, slots=True)
class Page:
    kind: str
    limit: int
    # The last key of the previous page ("" on the first).
    after: str

    @property
    def after_id(self) -> int:
        """The key of a list in id order (jobs): 0 on the first page."""
        if not self.after:
            return 0
        if not self.after.isdigit():
            raise validate.bad("page_token", "not a page token from this API")
        return int(self.after)

    def next_token(self, rows: Sequence[Row], key: Callable[[Row], object]) -> str:
        """A token for the next page when this one is full (the next may still be empty)."""
        return token(self.kind, str(key(rows[-1]))) if len(rows) == self.limit else ""


def read(kind: str, page_size: int, page_token: str, *, default: int = DEFAULT_PAGE) -> Page:
    """The page a request asks for; a bad size or a token from elsewhere is INVALID_ARGUMENT."""
    return Page(kind, validate.page_size("page_size", page_size, default),
                _key("page_token", kind, page_token))


def token(kind: str, key: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode()


def _key(field: str, kind: str, page_token: str) -> str:
    if not page_token:
        return ""
    try:
        text = base64.urlsafe_b64decode(page_token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise validate.bad(field, "not a page token from this API") from None
    prefix, sep, key = text.partition(":")
    if prefix != kind or not sep or "\x00" in key:
        raise validate.bad(field, "not a page token from this API")
    return key
