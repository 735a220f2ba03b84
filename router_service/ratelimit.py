"""Per-destination delivery rate: a token bucket that backs off when the destination says 429.

A destination configured with a rate gets at most that many deliveries per second (bursts up to
`burst`). Whatever its configuration, a 429 halves the rate it is sent (starting from what it
was actually receiving when it had no limit) and pauses it for the Retry-After it asked for.
Every second without another 429 then wins back a tenth of the rate it had before, until it is
back where it was: additive increase, multiplicative decrease, as TCP does.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Never slower than this after 429s: the destination still hears from us now and then.
FLOOR = 0.5


class RateLimiter:
    def __init__(self, per_second: float = 0.0, burst: int = 0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sent: deque[float] = deque(maxlen=512)
        self.configure(per_second, burst)

    def configure(self, per_second: float, burst: int) -> None:
        """Set the configured rate (0: unlimited); forgets any 429 penalty."""
        self.limit: float | None = per_second if per_second > 0 else None
        self.burst = float(burst) if burst > 0 else max(1.0, per_second)
        self.rate: float | None = self.limit
        self.tokens = self.burst
        self.paused_until = 0.0
        self._restore_to: float | None = self.limit
        self._changed = self._clock()

    def try_take(self) -> float:
        """Take a token if one is free and return 0; else the seconds until one will be."""
        return self.take_up_to(1)[1]

    def take_up_to(self, wanted: int) -> tuple[int, float]:
        """Take up to `wanted` tokens, one per job a delivery carries (a batch of 100 costs
        100): (taken, 0.0), or (0, the seconds until one will be free)."""
        now = self._clock()
        if now < self.paused_until:
            return 0, self.paused_until - now
        self._recover(now)
        if self.rate is None:
            self._sent.extend([now] * min(wanted, 512))
            return wanted, 0.0
        self.tokens = min(self.burst, self.tokens + (now - self._changed) * self.rate)
        self._changed = now
        # Refills are floats: exactly one interval is a token.
        taken = min(wanted, int(self.tokens + 1e-9))
        if taken == 0:
            return 0, (1.0 - self.tokens) / self.rate
        self.tokens = max(0.0, self.tokens - taken)
        self._sent.extend([now] * min(taken, 512))
        return taken, 0.0

    def give_back(self, count: int) -> None:
        """Tokens taken for jobs that did not go after all."""
        if count <= 0:
            return
        if self.rate is not None:
            self.tokens = min(self.burst, self.tokens + count)
        for _ in range(min(count, len(self._sent))):
            self._sent.pop()

    def too_many_requests(self, retry_after: float | None) -> None:
        """The destination answered 429 (optionally asking to wait `retry_after` seconds)."""
        now = self._clock()
        if self.rate is None:
            self._restore_to = None  # back to unlimited once recovered
            current = max(1.0, float(sum(1 for t in self._sent if now - t <= 1.0)))
        else:
            current = self.rate
        self.rate = max(FLOOR, current / 2)
        self._step = max(FLOOR, current / 10)
        self._ceiling = current
        self.tokens = min(self.tokens, 1.0)
        self._changed = now
        if retry_after:
            self.paused_until = max(self.paused_until, now + retry_after)
        # Recovery counts quiet seconds from the end of the pause the destination asked for.
        self._penalized = max(now, self.paused_until)

    def _recover(self, now: float) -> None:
        if self.rate is None or self.rate == self._restore_to:
            return
        quiet = now - self._penalized
        if quiet < 1.0:
            return
        self.rate = min(self._ceiling, self.rate + self._step * int(quiet))
        self._penalized += int(quiet)
        if self.rate >= self._ceiling:
            self.rate = self._restore_to if self._restore_to is not None else None
