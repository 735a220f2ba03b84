"""The handle Producer.send() returns: a concurrent.futures.Future, lighter on the GC.

A producer holds thousands of unanswered handles at once, long enough for Python's cyclic
garbage collector to promote them to its oldest generation, where every full collection
walks them all. A plain Future is nine tracked objects up front (its threading.Condition,
the lock's bound methods, a deque, two lists): measured with bench/ingest.py, the collector
then took a third of a flooding producer's CPU (about 20 us per event). A pending Handle is
one object: its condition (one object, with the protocol Future's own methods and
concurrent.futures.wait/as_completed use: with, acquire, release, wait, notify_all, on a
plain lock, since none of them takes a future's condition twice) and its lists are made
only when needed.
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


_MAKING = threading.Lock()
_NONE: tuple[Any, ...] = ()
# Future's states before it is done.
_UNDONE = ("PENDING", "RUNNING")


class Handle(Item, concurrent.futures.Future[T]):
    """A concurrent.futures.Future in every way a caller can see, and the lanes' Item of
    its event as well.

    While it waits for ingest's answer it is ONE object for the garbage collector: the
    condition and the two lists a Future makes up front are made when first needed (the
    condition when it is resolved or waited on; the waiter and callback lists when a waiter
    or callback is added, which Future only does before it is done). Future's own methods
    reach them through the properties below, unchanged. __init__ sets the rest of the fields
    Future.__init__ would; tests hold Handle to Future's behaviour.
    """

    __slots__ = ("_callbacks", "_cond", "_waiting")

    def __init__(self, frame: bytes = b"", message_id: str = "", key: str = "") -> None:
        Item.__init__(self, frame, message_id, key)
        self._cond: _Condition | None = None
        self._waiting: list[Any] | None = None
        self._callbacks: list[Any] | None = None
        self._state = "PENDING"
        self._result: Any = None
        self._exception: BaseException | None = None

    @property
    def _condition(self) -> _Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            # Made once even when the engine resolves the handle while a caller starts to
            # wait on it: both must use the same condition.
            with _MAKING:
                cond = self._cond
                if cond is None:
                    cond = self._cond = _Condition()
        return cond

    @property
    def _waiters(self) -> Any:  # type: ignore[override]
        # Made when first read: wait() and as_completed() add to finished futures' lists
        # too. Reached only under the condition, so made once.
        if self._waiting is None:
            self._waiting = []
        return self._waiting

    @property
    def _done_callbacks(self) -> Any:
        # Future adds callbacks only while not done (under the condition) and reads them
        # once done: a handle done without one reads an empty tuple and makes nothing.
        if self._callbacks is None:
            if self._state not in _UNDONE:
                return _NONE
            self._callbacks = []
        return self._callbacks
