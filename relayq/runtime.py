"""Running a service's event loop.

uvloop replaces asyncio's pure-Python loop with libuv. On the ingest hot path it cut the
process's CPU per event by about a sixth (44 -> 37 us, bench/ingest.py), since asyncio's own
selector and callback dispatch were a quarter of the profile. grpc.aio and psycopg both run on it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(main)
