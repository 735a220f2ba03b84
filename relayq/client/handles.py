"""The handle Producer.send() returns: a concurrent.futures.Future, lighter on the GC.

A plain Future carries a threading.Condition, which is nine objects for Python's cyclic
garbage collector (the condition, its lock's five bound methods, a deque...). A producer
holds thousands of handles at once, long enough for the collector to promote them to its
oldest generation, and every full collection then walks them all: measured with
bench/ingest.py, the collector took a third of a flooding producer's CPU (about 20 us per
event). This Future swaps in a condition that is one object, with the protocol the
Future's own methods and concurrent.futures.wait/as_completed use (with, acquire, release,
wait, notify_all) on a plain lock: none of them takes a future's condition twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Any, TypeVar

from relayq.client.lanes import Item

T = TypeVar("T")


class _Condition:
    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Locks of the threads waiting, made on first wait: most handles are never waited on.
        self._waiters: list[threading.Lock] | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """As threading.Condition.wait: called with the lock held, returns with it held."""
        waiter = threading.Lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        self._lock.release()
        got = False
        try:
            if timeout is None:
                got = waiter.acquire()
            elif timeout > 0:
                got = waiter.acquire(True, timeout)
            else:
                got = waiter.acquire(False)
            return got
        finally:
            self._lock.acquire()
            if not got and self._waiters is not None:
                # ValueError: notified just as the wait timed out.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.release()


class Handle(Item, concurrent.futures.Future[T]):
    """A concurrent.futures.Future in every way a caller can see, and the lanes' Item of
    its event as well (one object per event rather than two).

    __init__ sets the fields Future.__init__ would (a test holds the two to the same set),
    without making the Condition this class replaces: one per event, it was a tenth of
    send()'s cost.
    """

    def __init__(self, frame: bytes = b"", message_id: str = "", key: str = "") -> None:
        Item.__init__(self, frame, message_id, key)
        self._condition: Any = _Condition()
        self._state = "PENDING"
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
