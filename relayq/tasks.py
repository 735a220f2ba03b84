"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], *,
                          again_after: float = 1.0) -> None:
    """Cancel the tasks and wait until every one has ended, cancelling again while any runs.

    Python 3.11's asyncio.wait_for can lose a cancellation that arrives as the thing it
    waits for completes (gh-86296, fixed in 3.12), and psycopg_pool waits for connections
    through it: a loop cancelled just as a connection came free went on looping, and a
    router's stop waited for it forever (seen right after its pool had been exhausted).
    What the tasks raised is collected here, not left to warn when they are collected.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_after)
    for task in tasks:
        if not task.cancelled():
            task.exception()
