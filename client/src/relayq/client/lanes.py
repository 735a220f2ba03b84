"""The send buffer: one FIFO per ordered lane, shared by the senders and the engine.

Why lanes. Per-user order needs a user's next batch to wait until the previous one is
answered (a retried batch must not be overtaken). One in-flight batch *per user* would
give a user with many events one round trip per batch and force the engine to track every
user; instead each user hashes to one of `in_flight` lanes, and each lane has at most one
batch in flight. That is `in_flight` batches of parallelism, order per user for free (a lane
is a FIFO and is sent in order), and a retry holds back only the users of its lane.

Thread-safety: send() runs in the caller's threads and the engine in its event loop's
thread, so every change happens under one lock, held for a few attribute updates only.
The lock also decides when the engine's lane must be woken: only when it sleeps with
nothing to do (the first event after idle) or lingers and its batch just filled. A lane
that is sending looks at its queue again when the answer comes, so most send() calls
wake nobody, which matters when the wake-up is a cross-thread call (microseconds each).
"""

from __future__ import annotations

import threading
from collections import deque
from enum import IntEnum
from typing import Any

from relayq.client.errors import ProducerClosed


class Item:
    """One event from send() to its answer.

    `handle` is the future the engine resolves; None means the item is its own future
    (handles.Handle, the Producer's: one object per event instead of two).
    """

    __slots__ = ("at", "frame", "handle", "key", "message_id")

    def __init__(self, frame: bytes, message_id: str, key: str, handle: Any = None,
                 at: float = 0.0) -> None:
        # The serialised event, framed as one entry of IngestRequest.events (events.py).
        self.frame = frame
        self.message_id = message_id
        # The ordering key: user_id, else anonymous_id.
        self.key = key
        # An asyncio.Future (AsyncProducer), or None: see above.
        self.handle = handle
        # time.monotonic() at send(): linger and delivery_timeout count from here.
        self.at = at


class Offer(IntEnum):
    FULL = 0  # no room: nothing was added
    ADDED = 1
    WAKE = 2  # added, and the lane's worker must be woken


class _Lane:
    __slots__ = ("appended", "bytes", "idle", "lingering", "queue", "resolved")

    def __init__(self) -> None:
        self.queue: deque[Item] = deque()
        self.bytes = 0
        # The worker waits for a first event (idle) or for its linger to end (lingering).
        self.idle = True
        self.lingering = False
        # Events ever added and ever answered: flush() waits for answered >= added-at-call.
        self.appended = 0
        self.resolved = 0


class Lanes:
    def __init__(self, count: int, *, batch_events: int, batch_bytes: int, buffer_events: int,
                 buffer_bytes: int) -> None:
        self._lock = threading.Lock()
        self._lanes = [_Lane() for _ in range(count)]
        self._batch_events = batch_events
        self._batch_bytes = batch_bytes
        self._buffer_events = buffer_events
        self._buffer_bytes = buffer_bytes
        # Held from send() until answered, in-flight events included (as Kafka's buffer).
        self.events = 0
        self.bytes = 0
        # Events ever taken (the `sent` counter).
        self.taken = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._lanes)

    def lane_of(self, key: str) -> int:
        # Python's str hash is salted per process, which is all a lane needs: the same user
        # maps to the same lane for this producer's life.
        return hash(key) % len(self._lanes)

    def offer(self, lane: int, item: Item) -> Offer:
        size = len(item.frame)
        with self._lock:
            if self.closed:
                raise ProducerClosed("the producer is closed")
            if self.events >= self._buffer_events or self.bytes + size > self._buffer_bytes:
                return Offer.FULL
            self.events += 1
            self.bytes += size
            self.taken += 1
            state = self._lanes[lane]
            state.queue.append(item)
            state.bytes += size
            state.appended += 1
            if state.idle:
                state.idle = False
                return Offer.WAKE
            if state.lingering and (len(state.queue) >= self._batch_events
                                    or state.bytes >= self._batch_bytes):
                state.lingering = False
                return Offer.WAKE
            return Offer.ADDED

    def fits(self, size: int) -> bool:
        return self.events < self._buffer_events and self.bytes + size <= self._buffer_bytes

    def next_batch(self, lane: int, now: float, linger: float, force: bool
                   ) -> list[Item] | float | None:
        """The lane's next batch; or how long to linger for more; or None when empty (the
        lane is then idle, and the next offer wakes it)."""
        with self._lock:
            state = self._lanes[lane]
            queue = state.queue
            if not queue:
                state.idle = True
                state.lingering = False
                return None
            full = len(queue) >= self._batch_events or state.bytes >= self._batch_bytes
            if not (full or force):
                wait = queue[0].at + linger - now
                if wait > 0:
                    state.lingering = True
                    return wait
            state.lingering = False
            batch: list[Item] = []
            size = 0
            seen: set[str] = set()
            while queue and len(batch) < self._batch_events:
                item = queue[0]
                if batch and (size + len(item.frame) > self._batch_bytes
                              or item.message_id in seen):
                    # Full; or a message id repeated: ingest refuses a batch repeating one,
                    # and in the next batch it is simply answered DUPLICATE.
                    break
                queue.popleft()
                batch.append(item)
                size += len(item.frame)
                seen.add(item.message_id)
            state.bytes -= size
            return batch

    def resolved(self, lane: int, items: list[Item]) -> None:
        """Items answered (or given up): their room in the buffer is free again."""
        size = sum(len(item.frame) for item in items)
        with self._lock:
            self.events -= len(items)
            self.bytes -= size
            self._lanes[lane].resolved += len(items)

    def marks(self) -> list[int]:
        with self._lock:
            return [state.appended for state in self._lanes]

    def reached(self, marks: list[int]) -> bool:
        with self._lock:
            return all(state.resolved >= mark
                       for state, mark in zip(self._lanes, marks, strict=True))

    def close(self) -> None:
        with self._lock:
            self.closed = True

    def drain(self, lane: int) -> list[Item]:
        """Everything still queued in a lane (at close): the caller fails them."""
        with self._lock:
            state = self._lanes[lane]
            items = list(state.queue)
            state.queue.clear()
            state.bytes = 0
            return items
