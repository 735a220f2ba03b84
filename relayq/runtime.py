"""Running a service's event loop, and the garbage collector's settings for it.

uvloop replaces asyncio's pure-Python loop with libuv. On the ingest hot path it cut the
process's CPU per event by about a sixth (44 -> 37 us, bench/ingest.py), since asyncio's own
selector and callback dispatch were a quarter of the profile. grpc.aio and psycopg both run on it.

The cyclic garbage collector's defaults (a young collection every 700 container allocations)
suit short scripts, not a service that makes a few objects per event at tens of thousands of
events a second and holds tens of thousands of long-lived ones (a lane per destination):
with 10,000 destinations the router spent a third of its CPU collecting (bench/router.py
throughput --destinations 10000: 84-90 us of router CPU per job, 48-60 with these settings).
Everything alive once the service is imported is frozen (never scanned again), and young
collections run every 500,000 allocations not yet freed. Reference counting still frees
almost everything at once, so a young collection scans what is alive (the jobs in memory),
about the same whatever the threshold: at 50,000 the router collected 150 times in 1.2
million jobs (2.2-2.6 s, 8% of its CPU, pauses up to 70 ms); at 500,000 not once, with the
same peak memory (bench/router.py throughput --jobs 1200000 --start running; 2026-12-08).
Only cycles wait longer.
"""

from __future__ import annotations

import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    gc.freeze()
    gc.set_threshold(500_000, 20, 50)
    return uvloop.run(main)
