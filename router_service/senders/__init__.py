"""The router's senders, one per destination type (relayq.destination_types).

A new destination type is a module here with a class taking (Destination, SenderContext), its
line in SENDERS, and its entry in relayq.destination_types (tests hold the two equal).
"""

from __future__ import annotations

from collections.abc import Callable

from jobsdb.catalog import Destination
from router_service.senders.base import Sender, SenderContext, needs_new_sender
from router_service.senders.grpc import GrpcSender
from router_service.senders.nats import NatsSender
from router_service.senders.webhook import WebhookSender

SENDERS: dict[str, Callable[[Destination, SenderContext], Sender]] = {
    "webhook": WebhookSender,
    "grpc": GrpcSender,
    "nats": NatsSender,
}

__all__ = ["SENDERS", "Sender", "SenderContext", "UnknownType", "make", "needs_new_sender"]


class UnknownType(LookupError):
    """A destination row of a type this router cannot deliver to (written by a newer
    version, or by hand)."""


def make(destination: Destination, context: SenderContext) -> Sender:
    try:
        factory = SENDERS[destination.type]
    except KeyError:
        raise UnknownType(f"destination {destination.id!r} has type {destination.type!r},"
                          f" which this router cannot deliver to") from None
    return factory(destination, context)
