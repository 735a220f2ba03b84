"""Waiting for something to become true, with a deadline: the one poll-until of the tests.

A test never sleeps a fixed time and then asserts: that flakes on a slow machine and can pass
without the thing having happened. It polls with a deadline instead, through these two (ruff's
banned-api holds `time.sleep` out of every other test module).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

Describe = str | Callable[[], str] | Callable[[], Awaitable[str]]


async def eventually(check: Callable[[], T] | Callable[[], Awaitable[T]], *,
                     within: float = 30.0, every: float = 0.1,
                     what: Describe = "the condition",
                     woken_by: asyncio.Event | None = None) -> T:
    """Call `check` (sync or async) until it returns something truthy, and return that.

    Fails with an AssertionError after `within` seconds; `what` says what was awaited (a
    callable is asked only then, for the state worth showing). With `woken_by`, an event that
    is set when something changed (a sink's arrivals), it checks again as soon as that is set,
    and every `every` seconds anyway."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if woken_by is not None:
            woken_by.clear()
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if loop.time() > deadline:
            described = what() if callable(what) else what
            if inspect.isawaitable(described):
                described = await described
            raise AssertionError(f"{described} not met within {within:g}s")
        if woken_by is None:
            await asyncio.sleep(every)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken_by.wait(), every)


def wait_until(check: Callable[[], T], *, within: float = 30.0, every: float = 0.1,
               what: str | Callable[[], str] = "the condition") -> T:
    """`eventually` for code without an event loop."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what} not met within"
                                 f" {within:g}s")
        time.sleep(every)
