"""Per-source rate limits at the door: a token bucket per source, in this process.

A source over its limit gets RESOURCE_EXHAUSTED for the whole batch (nothing is written) and
is told when to come back, instead of filling the queue every tenant's destinations share.
The buckets are per ingest process, not shared through Postgres: a counter row per source
would make every batch of every source write the same hot rows. With N ingest processes
behind a balancer a source can get up to N times its limit; configure it knowing that.

A batch larger than the burst goes when the bucket is full and leaves it in debt, so a
limit is never a reason a valid batch can not go at all, and the long-run rate still holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# The longest a refusal tells a client to wait (tiny rates would otherwise say centuries).
MAX_WAIT = 3600.0


@dataclass(slots=True)
class _Bucket:
    rate: float
    burst: float
    tokens: float
    at: float


class SourceQuotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}

    def take(self, source_key: int, per_second: float, burst: int, events: int) -> float:
        """Take `events` tokens and return 0, or return the seconds until they could go
        (at most MAX_WAIT: the client asks again then, under whatever limit holds)."""
        if per_second <= 0:
            self._buckets.pop(source_key, None)
            return 0.0
        now = self._clock()
        size = float(burst) if burst > 0 else max(1.0, per_second)
        bucket = self._buckets.get(source_key)
        if bucket is None:
            bucket = self._buckets[source_key] = _Bucket(per_second, size, size, now)
        else:
            bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.at) * bucket.rate)
            if (bucket.rate, bucket.burst) != (per_second, size):
                # The limit changed: what the source owes stays owed, at the new rate.
                bucket.rate, bucket.burst = per_second, size
                bucket.tokens = min(bucket.tokens, size)
        bucket.at = now
        needed = min(float(events), bucket.burst)
        if bucket.tokens + 1e-9 < needed:
            return min(MAX_WAIT, (needed - bucket.tokens) / bucket.rate)
        bucket.tokens -= events
        return 0.0

    def give_back(self, source_key: int, events: int) -> None:
        """Return what `take` took for a batch that was then not stored."""
        bucket = self._buckets.get(source_key)
        if bucket is not None:
            bucket.tokens = min(bucket.burst, bucket.tokens + events)
