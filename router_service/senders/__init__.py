"""The router's senders, one per destination type (relayq.destination_types).

A new destination type is a module here with a class taking (Destination, SenderContext), its
line in SENDERS, and its entry in relayq.destination_types (tests hold the two equal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from jobsdb.catalog import Destination
from router_service.model import Job
from router_service.retry import Result, Verdict
from router_service.senders.base import Sender, SenderContext, needs_new_sender
from router_service.senders.grpc import GrpcSender
from router_service.senders.nats import NatsSender
from router_service.senders.webhook import WebhookSender

SENDERS: dict[str, Callable[[Destination, SenderContext], Sender]] = {
    "webhook": WebhookSender,
    "grpc": GrpcSender,
    "nats": NatsSender,
}

log = logging.getLogger(__name__)

__all__ = ["SENDERS", "Sender", "SenderContext", "UnknownType", "make", "needs_new_sender"]


class UnknownType(LookupError):
    """A destination row of a type this router cannot deliver to (written by a newer
    version, or by hand)."""


class _Unreadable(Sender):
    """A destination whose sealed secrets, headers or endpoint this router cannot open (a key
    not in its RELAYQ_SECRET_KEYS, as after a rekey by a process with a newer key): every
    attempt fails, to be retried, and nothing is sent, least of all unsigned."""

    max_batch = 100

    def __init__(self, destination: Destination) -> None:
        self._result = Result(Verdict.RETRY, "secret_key",
                              f"cannot read this destination's secrets: {destination.unreadable}")

    async def deliver(self, jobs: Sequence[Job]) -> list[Result]:
        return [self._result] * len(jobs)


def make(destination: Destination, context: SenderContext) -> Sender:
    if destination.unreadable is not None:
        log.error("destination %s: cannot read its secrets: %s", destination.id,
                  destination.unreadable, extra={"destination": destination.id})
        return _Unreadable(destination)
    try:
        factory = SENDERS[destination.type]
    except KeyError:
        raise UnknownType(f"destination {destination.id!r} has type {destination.type!r},"
                          f" which this router cannot deliver to") from None
    return factory(destination, context)
