"""Which Ingest failures are retried, and how long to wait between tries.

Retried: UNAVAILABLE (ingest down or restarting, its database unreachable: nothing was
stored), DEADLINE_EXCEEDED (the answer did not come in time: the batch may have been stored,
and the retry is answered DUPLICATE for what was) and RESOURCE_EXHAUSTED (the source's rate
limit: nothing was stored; ingest says when to come back in a google.rpc.RetryInfo). Never
retried: INVALID_ARGUMENT (the same bytes would be refused again; the engine splits the batch
instead), UNAUTHENTICATED and PERMISSION_DENIED (a key or source problem only a person can
fix), nor anything else (INTERNAL is a server bug, not a moment's trouble).

The waits come from the generator below, which the engine's retry loop (engine.py) drives:
full-jitter exponential backoff (AWS's "full jitter": spreads the retries of many producers
after an outage), raised to at least what RetryInfo asked for.

RetryInfo is read with two messages of google/rpc (Status, RetryInfo) declared here in a
descriptor pool of the client's own: googleapis-common-protos would be a dependency for two
messages, and a second copy of its files in protobuf's default pool (relayq's own
distribution loads them, through grpcio-status) could conflict with it. A pool of our own
conflicts with nothing, and the wire format is what matters.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import Message

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})

_DETAILS_KEY = "grpc-status-details-bin"
# One generator for every wait: the engine primes a new wait generator for every batch it
# sends, and seeding a fresh Random from the OS each time was a visible cost per batch.
_RANDOM = random.Random()


class Retryable(Exception):
    """A failed attempt worth trying again (after `retry_after` seconds at least); `attempts`
    is how many tries of the batch this one was."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None,
                 attempts: int = 0) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after = retry_after
        self.attempts = attempts


def _rpc_messages() -> tuple[type[Message], type[Message]]:
    """google.rpc.Status and google.rpc.RetryInfo (google/rpc/status.proto and
    error_details.proto: the fields read here, same numbers), in a pool of our own."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(duration_pb2.DESCRIPTOR.serialized_pb)
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="relayq/client/google_rpc.proto", package="google.rpc", syntax="proto3",
        dependency=["google/protobuf/any.proto", "google/protobuf/duration.proto"])
    status = file.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=field.TYPE_STRING,
                     label=field.LABEL_OPTIONAL)
    status.field.add(name="details", number=3, type=field.TYPE_MESSAGE,
                     label=field.LABEL_REPEATED, type_name=".google.protobuf.Any")
    info = file.message_type.add(name="RetryInfo")
    info.field.add(name="retry_delay", number=1, type=field.TYPE_MESSAGE,
                   label=field.LABEL_OPTIONAL, type_name=".google.protobuf.Duration")
    pool.Add(file)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.RetryInfo")))


_Status, _RetryInfo = _rpc_messages()
_RETRY_INFO_TYPE = "google.rpc.RetryInfo"


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """Seconds from a google.rpc.RetryInfo in the status details, if the server sent one."""
    # Typed loosely by grpc-stubs; at run time pairs of (key, str or bytes).
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        # Typed loosely: messages made at run time, from the pool above.
        status: Any = _Status()
        try:
            status.ParseFromString(value)
            for detail in status.details:
                # type.googleapis.com/google.rpc.RetryInfo: the name after the last '/'.
                if detail.type_url.rpartition("/")[2] == _RETRY_INFO_TYPE:
                    info: Any = _RetryInfo.FromString(detail.value)
                    seconds: float = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
                    return max(0.0, seconds)
        except Exception:  # a malformed trailer is no reason to fail the retry itself
            return None
    return None


def waits(minimum: float, maximum: float, rng: random.Random | None = None
          ) -> Generator[float, BaseException | None, None]:
    """The waits between tries of one batch (the jitter is applied here, below the RetryInfo
    floor, so no later jitter cuts into what the server asked for).

    Primed with send(None), then each failure is sent in; the n-th wait is uniform in
    [minimum, min(maximum, minimum * 2^n)], or the server's retry_after if longer.
    """
    rng = rng or _RANDOM
    failure = yield 0.0  # primed with send(None)
    attempt = 0
    while True:
        ceiling = min(maximum, minimum * 2.0 ** min(attempt, 60))
        wait = rng.uniform(minimum, ceiling)
        floor = getattr(failure, "retry_after", None)
        if floor is not None:
            wait = max(wait, floor)
        attempt += 1
        failure = yield wait
