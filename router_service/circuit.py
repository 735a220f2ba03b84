"""A destination's circuit breaker, as one router sees it. Pure: the lane feeds it answers and
the time, and writes what it decides (the open circuit lives on the destination's row, so
every router, the admin API and operators see one state).

Closed, it counts a streak of failed attempts; when every attempt has failed for
`open_after` seconds and at least `min_failures` times, it opens. Open, the lane sends only a
probe (the next job in order) every `probe_every` seconds; the first success closes it, and
delivery resumes in order. An answer that shows the destination alive (a success, or a 4xx
that aborts the job) ends a streak; a 429 is the destination pacing us, not failing, and
counts for neither. An attempt the network policy stopped (blocked_address) aborts its job,
yet counts as a failure: nothing answered, and nothing will while the endpoint leads there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from router_service.retry import BLOCKED_ADDRESS, Result, Verdict


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    # Seconds of nothing but failures before opening; 0: never open.
    open_after: float
    min_failures: int
    # Seconds between probes while open.
    probe_every: float


class Change(Enum):
    OPENED = "opened"
    CLOSED = "closed"


class Breaker:
    def __init__(self, policy: CircuitPolicy, *, is_open: bool = False) -> None:
        self.policy = policy
        self.is_open = is_open
        self._streak_started: float | None = None  # monotonic
        self._failures = 0
        self._last_error = ""
        self._next_probe = 0.0  # monotonic

    def record(self, result: Result, now: float) -> Change | None:
        """One attempt's answer; returns the change it makes, if any."""
        if ((result.verdict is Verdict.RETRY and result.error_code != "429")
                or result.error_code == BLOCKED_ADDRESS):
            if self._streak_started is None:
                self._streak_started = now
            self._failures += 1
            self._last_error = result.error_code
            if (not self.is_open and self.policy.open_after > 0
                    and now - self._streak_started >= self.policy.open_after
                    and self._failures >= self.policy.min_failures):
                self.is_open = True
                self._next_probe = now + self.policy.probe_every
                return Change.OPENED
            return None
        if result.error_code == "429":
            return None
        self._streak_started, self._failures = None, 0
        if self.is_open and result.verdict is Verdict.OK:
            self.is_open = False
            return Change.CLOSED
        return None

    @property
    def reason(self) -> str:
        """Why it opened, for the destination's row and the operator."""
        seconds = self.policy.open_after
        return (f"every attempt failed for {seconds:g}s or more ({self._failures} attempts);"
                f" last error: {self._last_error or 'unknown'}")

    def set_open(self, is_open: bool, now: float) -> None:
        """Opened or closed elsewhere (another router, an operator)."""
        if is_open and not self.is_open:
            self._next_probe = now + self.policy.probe_every
        if not is_open:
            self._streak_started, self._failures = None, 0
        self.is_open = is_open

    def probe_wait(self, now: float) -> float:
        """Open: seconds until the next probe may go (0: now). Closed: 0."""
        return max(0.0, self._next_probe - now) if self.is_open else 0.0

    def probed(self, now: float) -> None:
        """A probe went out: the next one waits a full interval."""
        self._next_probe = now + self.policy.probe_every
