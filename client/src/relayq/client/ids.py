"""Message ids: UUIDv7 (RFC 9562), time-ordered and unique, made at send() time.

The id is what makes a retry safe: ingest de-duplicates by (source, message_id), so the id is
fixed when the event is made and travels unchanged in every retry of its batch.

Layout: 48 bits of Unix milliseconds, the version, then 74 bits that start random each
millisecond and count up within it (RFC 9562 section 6.2, method 3 "monotonic random"), so ids
from one producer sort in send() order even within a millisecond, and two producers collide
only if they draw the same 74 random bits in the same millisecond.
"""

from __future__ import annotations

import os
import threading
import time

_RANDOM_BITS = 74
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_VERSION_7 = 0x7 << 76
_VARIANT = 0b10 << 62


class MessageIds:
    """A source of UUIDv7 strings; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._millis = 0
        self._random = 0

    def new(self) -> str:
        millis = time.time_ns() // 1_000_000
        with self._lock:
            if millis > self._millis:
                self._millis = millis
                self._random = int.from_bytes(os.urandom(10)) & _RANDOM_MASK
            else:
                # Same millisecond (or the clock stepped back): count on from the last id.
                self._random += 1
                if self._random > _RANDOM_MASK:  # 2^74 ids in one millisecond: borrow the next
                    self._millis += 1
                    self._random = int.from_bytes(os.urandom(10)) & _RANDOM_MASK
            millis, rand = self._millis, self._random
        # 12 bits of the random part go before the variant, 62 after it.
        value = (millis << 80) | _VERSION_7 | ((rand >> 62) << 64) | _VARIANT \
            | (rand & ((1 << 62) - 1))
        text = f"{value:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
