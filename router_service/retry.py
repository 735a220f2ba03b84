"""What to do after an attempt: succeed, retry later, or give up. Pure functions.

The policy is rudder-server's, per destination: exponential backoff between min and max, and a
job is given up only when it has failed at least max_attempts times AND its first attempt is
older than the retry window, so a short outage never aborts jobs and a long one eventually
does. Non-retryable answers (most 4xx) abort at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

import backoff

# The error code of an attempt the network policy stopped before any connection
# (router_service.resolver): not retried (the address will not become allowed by waiting),
# but a failure of the destination all the same, counted by its circuit breaker.
BLOCKED_ADDRESS = "blocked_address"


class Verdict(Enum):
    OK = "ok"
    RETRY = "retry"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Result:
    """What a destination answered to one job."""

    verdict: Verdict
    # "200", "503", "timeout", "connection", "tls", "grpc:UNAVAILABLE", "config", ... ("" on
    # success).
    error_code: str = ""
    # The answer's body or the error text (trimmed before storage).
    response: str = ""
    # The destination asked to wait at least this long (Retry-After, retry_after_ms).
    retry_after: float | None = None
    # The webhook-id of the batch request that carried the job (batched webhooks only).
    batch: str | None = None
    # What a destination answered on success, when it says more than OK: an HTTP status.
    status: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    min_backoff: float
    max_backoff: float
    max_attempts: int
    max_retry_window: timedelta


def backoff_delay(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before retrying after failed attempt number `attempt` (1-based).

    The base doubles per attempt (backoff.expo); jitter keeps it between half and all of that,
    so jobs that failed together (an outage) do not all come back at the same instant.
    """
    waits = backoff.expo(base=2, factor=policy.min_backoff, max_value=policy.max_backoff)
    next(waits)  # backoff's generators yield None first
    for _ in range(max(0, attempt - 1)):
        next(waits)
    base = float(next(waits))
    return base * (0.5 + 0.5 * (rng or random).random())


def gives_up(policy: RetryPolicy, attempt: int, first_attempt_at: datetime, now: datetime) -> bool:
    return attempt >= policy.max_attempts and now - first_attempt_at >= policy.max_retry_window


def classify_http(status: int) -> Verdict:
    """2xx succeeded; 408, 429 and 5xx are worth retrying; any other status will not change."""
    if 200 <= status < 300:
        return Verdict.OK
    if status in (408, 429) or status >= 500:
        return Verdict.RETRY
    return Verdict.ABORT


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())
