"""The types of destination relayq delivers to: their names and what a valid one looks like.

The admin service checks a destination against its type here before storing it, the CLI offers
these names, and the router has one sender per name (router_service.senders.SENDERS, which a
test holds equal to TYPES). So a new type is an entry here, a sender module and its registry
line: nothing else lists the types (the database only checks the name's shape).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from relayq import endpoints


class Unusable(ValueError):
    """An endpoint or header the type cannot use; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class DestinationType:
    name: str
    # What its endpoint is, for help texts.
    endpoint_help: str
    # Raises Unusable for an endpoint this type cannot deliver to.
    check_endpoint: Callable[[str], None]
    # The headers as stored (normalised), or Unusable naming the first the type cannot carry.
    normalise_headers: Callable[[dict[str, str]], dict[str, str]]
    # Header names compare without case (stored lowered), so updates merge by lowered name.
    lowercase_headers: bool = False
    # Requests are signed with a secret of the destination's (Standard Webhooks): one is made
    # with the destination and can be rotated.
    signed: bool = False


def _webhook_endpoint(value: str) -> None:
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # an unclosed IPv6 bracket, for one
        raise Unusable(f"not a URL ({exc}): {value!r}") from None
    try:
        port = parts.port
    except ValueError:
        raise Unusable(f"invalid port in {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unusable(f"a webhook endpoint is an http:// or https:// URL; got {value!r}")
    if port == 0:
        raise Unusable(f"invalid port in {value!r}")


# Headers the router sets on every webhook request itself: the body's type and length, what
# relayq calls the job, and the Standard Webhooks signature. A destination cannot set them.
WEBHOOK_OWN_HEADERS = frozenset({
    "content-length", "content-type", "transfer-encoding", "connection",
    "x-relayq-message-id", "x-relayq-job-id", "x-relayq-attempt",
    "webhook-id", "webhook-timestamp", "webhook-signature",
})


def _webhook_headers(values: dict[str, str]) -> dict[str, str]:
    for name in values:
        if name.lower() in WEBHOOK_OWN_HEADERS:
            raise Unusable(f"{name!r} is set by relayq on every webhook request")
    return values


def _grpc_endpoint(value: str) -> None:
    try:
        endpoints.parse_grpc(value)
    except endpoints.NotForGrpc as exc:
        raise Unusable(str(exc)) from None


def _grpc_headers(values: dict[str, str]) -> dict[str, str]:
    try:
        return dict(endpoints.metadata(values))
    except endpoints.NotForGrpc as exc:
        raise Unusable(str(exc)) from None


WEBHOOK = DestinationType(
    "webhook", "an http:// or https:// URL; each job is POSTed to it as JSON",
    _webhook_endpoint, _webhook_headers, signed=True)
GRPC = DestinationType(
    "grpc", "host:port, grpc://host:port or grpcs://host:port (TLS) of a relayq.v1.Destination",
    _grpc_endpoint, _grpc_headers, lowercase_headers=True)

TYPES: dict[str, DestinationType] = {t.name: t for t in (WEBHOOK, GRPC)}


def names() -> str:
    """The types for messages: 'webhook' or 'grpc'."""
    quoted = [f"'{name}'" for name in TYPES]
    return ", ".join(quoted[:-1]) + (" or " if len(quoted) > 1 else "") + quoted[-1]
