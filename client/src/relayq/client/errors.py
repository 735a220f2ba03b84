"""What the producer library raises, and what a send's handle may end with.

All of them derive from ClientError, so a caller can catch the library's errors in one place.
A gRPC status never reaches the caller as a grpc exception: it arrives as DeliveryFailed with
the code and the server's message.
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """Base of every error raised by relayq.client."""


class InvalidOption(ClientError, ValueError):
    """A producer option is out of range; the message names it. Raised at construction."""


class InvalidEvent(ClientError, ValueError):
    """send() was given an event that ingest would refuse; the message names the field.

    Raised by send() itself: nothing was queued. The checks are the server's size limits
    (relayq.client.limits) and required fields; what only the server can judge (a destination
    id not connected to the source, say) comes back as a REJECTED result instead.
    """


class BufferFull(ClientError):
    """The send buffer is full: raised at once (when_full="raise") or after block_timeout."""


class ProducerClosed(ClientError):
    """send() after close(), or an event still unacknowledged when close() gave up."""


class DeliveryFailed(ClientError):
    """Ingest never acknowledged the event: a permanent error (a bad write key, a disabled
    source), or retries ran out (max_retries, delivery_timeout). The event may or may not
    have been stored: sending it again with the same message_id is safe either way."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None,
                 attempts: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.attempts = attempts
