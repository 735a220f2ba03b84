"""Which Ingest failures are retried, and how long to wait between tries.

Retried: UNAVAILABLE (ingest down or restarting, its database unreachable: nothing was
stored), DEADLINE_EXCEEDED (the answer did not come in time: the batch may have been stored,
and the retry is answered DUPLICATE for what was) and RESOURCE_EXHAUSTED (the source's rate
limit: nothing was stored; ingest says when to come back in a google.rpc.RetryInfo). Never
retried: INVALID_ARGUMENT (the same bytes would be refused again; the engine splits the batch
instead), UNAUTHENTICATED and PERMISSION_DENIED (a key or source problem only a person can
fix), nor anything else (INTERNAL is a server bug, not a moment's trouble).

The waits come from the `backoff` package's retry loop with the generator below: full-jitter
exponential backoff (AWS's "full jitter": spreads the retries of many producers after an
outage), raised to at least what RetryInfo asked for.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})

_DETAILS_KEY = "grpc-status-details-bin"
# One generator for every wait: backoff primes a new wait generator for every batch it
# sends, and seeding a fresh Random from the OS each time was a visible cost per batch.
_RANDOM = random.Random()


class Retryable(Exception):
    """A failed attempt worth trying again (after `retry_after` seconds at least)."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """Seconds from a google.rpc.RetryInfo in the status details, if the server sent one."""
    # Typed loosely by grpc-stubs; at run time pairs of (key, str or bytes).
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a malformed trailer is no reason to fail the retry itself
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay: duration_pb2.Duration = info.retry_delay
                return max(0.0, delay.seconds + delay.nanos / 1e9)
    return None


def waits(minimum: float, maximum: float, rng: random.Random | None = None
          ) -> Generator[float, BaseException | None, None]:
    """A `backoff` wait generator (use with jitter=None: the jitter is applied here, below
    the RetryInfo floor, which backoff's own jitter would otherwise cut into).

    backoff sends each failure in; the n-th wait is uniform in [minimum, min(maximum,
    minimum * 2^n)], or the server's retry_after if longer.
    """
    rng = rng or _RANDOM
    failure = yield 0.0  # backoff primes the generator with send(None)
    attempt = 0
    while True:
        ceiling = min(maximum, minimum * 2.0 ** min(attempt, 60))
        wait = rng.uniform(minimum, ceiling)
        floor = getattr(failure, "retry_after", None)
        if floor is not None:
            wait = max(wait, floor)
        attempt += 1
        failure = yield wait
