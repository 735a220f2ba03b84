"""What a send resolves to, and the producer's counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Status(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class SendResult(NamedTuple):
    """Ingest's answer for one event, once it is committed (or refused).

    A NamedTuple rather than a dataclass: one is built per event on the hot path, and a
    tuple costs a fifth of a frozen dataclass to make.
    """

    message_id: str
    status: Status
    # The event's id in ingest's log (ACCEPTED only; 0 otherwise). Routers make its jobs,
    # one per destination that takes it, when they read it; a job's id is
    # (event_id << 16) | the connection's slot.
    event_id: int = 0
    # Why ingest refused the event (REJECTED only).
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.status is Status.ACCEPTED

    @property
    def duplicate(self) -> bool:
        """Already stored earlier (this message_id was seen): not stored again."""
        return self.status is Status.DUPLICATE

    @property
    def rejected(self) -> bool:
        return self.status is Status.REJECTED


@dataclass(slots=True)
class Counters:
    """Events since the producer started, by what became of them. `producer.counters` is
    a copy, taken when read.

    sent = accepted + duplicate + rejected + dropped + those still waiting for an answer.
    """

    # Taken by send() into the buffer.
    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    # Events sent again after a retryable failure (one event retried twice counts 2).
    retried: int = 0
    # Events that will never be acknowledged: permanent errors, retries or time run out, or
    # still unanswered when close() gave up.
    dropped: int = 0
    # Ingest requests answered (for the average batch size: (accepted + ...) / batches).
    batches: int = 0
