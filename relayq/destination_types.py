"""The types of destination relayq delivers to: their names and what a valid one looks like.

The admin service checks a destination against its type here before storing it, the CLI offers
these names, and the router has one sender per name (router_service.senders.SENDERS, which a
test holds equal to TYPES). So a new type is an entry here, a sender module and its registry
line: nothing else lists the types (the database only checks the name's shape).
"""

from __future__ import annotations

import re
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
    # The host a (checked) endpoint connects to, as written: a name or a literal address.
    host: Callable[[str], str]
    # The headers as stored (normalised), or Unusable naming the first the type cannot carry.
    normalise_headers: Callable[[dict[str, str]], dict[str, str]]
    # Header names compare without case (stored lowered), so updates merge by lowered name.
    lowercase_headers: bool = False
    # Requests are signed with a secret of the destination's (Standard Webhooks): one is made
    # with the destination and can be rotated.
    signed: bool = False
    # Takes a batch policy (several events a request, as a JSON array).
    batches: bool = False


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
# relayq calls the job, the Standard Webhooks signature and the event's trace context. A
# destination cannot set them.
WEBHOOK_OWN_HEADERS = frozenset({
    "content-length", "content-type", "transfer-encoding", "connection",
    "x-relayq-message-id", "x-relayq-job-id", "x-relayq-attempt",
    "webhook-id", "webhook-timestamp", "webhook-signature",
    "traceparent", "x-relayq-traceparents",
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


def _url_host(value: str) -> str:
    return urlsplit(value).hostname or ""


def _grpc_host(value: str) -> str:
    return endpoints.parse_grpc(value).host


def _grpc_headers(values: dict[str, str]) -> dict[str, str]:
    try:
        return dict(endpoints.metadata(values))
    except endpoints.NotForGrpc as exc:
        raise Unusable(str(exc)) from None


# --- nats ----------------------------------------------------------------------------------
# A NATS JetStream destination's endpoint is the server and the subject template in one URL,
# nats://[user:password@]host[:port]/events.{tenant}.{user_id} (tls:// for TLS), so no column
# of its own is needed. Admin and the router parse it here, so they cannot disagree.

# What a subject template may name; the router fills each in per job, encoded as one token.
NATS_PLACEHOLDERS = ("tenant", "destination", "user_id", "event")
_NATS_SCHEMES = {"nats": False, "tls": True}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# Literal subject text: printable ASCII but for the wildcards '*' and '>' (JetStream stores a
# message published to "a.*" under that very name), braces and '%' (placeholder values are
# percent-encoded: a literal '%' would make their decoding ambiguous). '.' separates tokens.
_NOT_LITERAL = frozenset("*>%{}")


@dataclass(frozen=True, slots=True)
class NatsEndpoint:
    # What the NATS client connects to: scheme://[credentials@]host[:port], without the subject.
    server: str
    tls: bool
    # The subject template split at its placeholders: literal text at even indexes (maybe
    # empty), placeholder names at odd ones.
    subject: tuple[str, ...]


def parse_nats(value: str) -> NatsEndpoint:
    """The endpoint of a nats destination, or Unusable saying what is wrong with it."""
    example = "nats://host:4222/events.{tenant}.{user_id}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:  # an unclosed IPv6 bracket, a port that is no number
        raise Unusable(f"not a nats:// or tls:// URL ({exc}): {value!r}") from None
    if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
        raise Unusable(f"a nats endpoint is a nats:// or tls:// (TLS) URL of the server with the"
                       f" subject as its path, e.g. {example}; got {value!r}")
    if port == 0:
        raise Unusable(f"invalid port in {value!r}")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise Unusable(f"a nats endpoint has no query or fragment (the subject is the path,"
                       f" e.g. {example}); got {value!r}")
    template = parts.path.removeprefix("/")
    if not template:
        raise Unusable(f"a nats endpoint names the subject after the server, e.g. {example};"
                       f" got {value!r}")
    return NatsEndpoint(f"{parts.scheme}://{parts.netloc}", _NATS_SCHEMES[parts.scheme],
                        _subject_template(template))


def _subject_template(template: str) -> tuple[str, ...]:
    pieces = tuple(_PLACEHOLDER.split(template))
    known = ", ".join(f"{{{name}}}" for name in NATS_PLACEHOLDERS)
    for index, piece in enumerate(pieces):
        if index % 2:
            if piece not in NATS_PLACEHOLDERS:
                raise Unusable(f"subject {template!r}: unknown placeholder {{{piece}}}; known"
                               f" are {known}")
        elif "{" in piece or "}" in piece:
            raise Unusable(f"subject {template!r}: a brace that opens or closes no placeholder"
                           f" ({known})")
        elif bad := next((c for c in piece if not "!" <= c <= "~" or c in _NOT_LITERAL), ""):
            what = ("a wildcard, which cannot be published to" if bad in "*>"
                    else "percent-encoding is relayq's own, for placeholder values" if bad == "%"
                    else "subjects here are printable ASCII without spaces")
            raise Unusable(f"subject {template!r}: {bad!r} is not allowed ({what})")
    # Every token must be non-empty once placeholders are filled in (they never fill in empty).
    tokens = "".join(piece if index % 2 == 0 else "x"
                     for index, piece in enumerate(pieces)).split(".")
    if "" in tokens:
        raise Unusable(f"subject {template!r}: an empty token (a leading or trailing '.', or"
                       " two in a row)")
    if tokens[0].startswith("$"):
        raise Unusable(f"subject {template!r}: subjects starting with '$' are the NATS server's"
                       " own ($JS, $SYS, $KV, ...)")
    return pieces


def _nats_endpoint(value: str) -> None:
    parse_nats(value)


def _nats_headers(values: dict[str, str]) -> dict[str, str]:
    for name in values:
        if name.lower().startswith("nats-"):
            raise Unusable(f"header {name!r}: Nats-* headers steer JetStream itself (relayq sets"
                           " Nats-Msg-Id; Nats-Expected-* would make publishes fail)")
    return dict(values)


WEBHOOK = DestinationType(
    "webhook", "an http:// or https:// URL; each job is POSTed to it as JSON (or, with a"
    " batch policy, many as a JSON array)",
    _webhook_endpoint, _url_host, _webhook_headers, signed=True, batches=True)
GRPC = DestinationType(
    "grpc", "host:port, grpc://host:port or grpcs://host:port (TLS) of a relayq.v1.Destination",
    _grpc_endpoint, _grpc_host, _grpc_headers, lowercase_headers=True)
NATS = DestinationType(
    "nats", "nats://host:port/subject or tls://host:port/subject (TLS) of a NATS JetStream"
    " server; the subject may hold {tenant}, {destination}, {user_id} and {event}",
    _nats_endpoint, _url_host, _nats_headers)

TYPES: dict[str, DestinationType] = {t.name: t for t in (WEBHOOK, GRPC, NATS)}


def names() -> str:
    """The types for messages: 'webhook', 'grpc' or 'nats'."""
    quoted = [f"'{name}'" for name in TYPES]
    return ", ".join(quoted[:-1]) + (" or " if len(quoted) > 1 else "") + quoted[-1]
