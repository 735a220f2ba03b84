"""relayq.tasks: stopping background tasks for good."""

from __future__ import annotations

import asyncio

import pytest

from relayq.tasks import cancel_and_wait


async def test_a_task_that_lost_a_cancellation_is_cancelled_again() -> None:
    """As a loop inside Python 3.11's wait_for can: it goes on as if never cancelled."""
    cancellations = 0

    async def loop() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    continue  # lost
                raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task], again_after=0.05), 5)
    assert task.cancelled()
    assert cancellations == 2


async def test_what_a_task_raised_is_collected_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait([task])
    with pytest.raises(RuntimeError):
        task.result()
