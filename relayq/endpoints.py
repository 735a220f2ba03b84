"""What a gRPC destination's endpoint says: where to connect and whether over TLS.

Written `host:port` or `grpc://host:port` (plaintext, for sinks inside the operator's own
network) or `grpcs://host:port` (TLS, the certificate checked against the host name). The admin
service refuses anything else; the router parses the same way, so the two cannot disagree.

Configured headers travel to gRPC sinks as call metadata. HTTP/2 header names are lower case,
and gRPC keeps some names for itself, so a name is lowered once here and the reserved ones are
refused before they reach a channel (which would fail every call with an opaque error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_SCHEMES = {"grpc://": False, "grpcs://": True}
# What gRPC takes as a (lower-cased, non-binary) metadata name.
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")

# Names gRPC or HTTP/2 set themselves; a call carrying them is refused by the library.
RESERVED_METADATA = frozenset({"content-type", "te", "host", "user-agent", "connection",
                               "transfer-encoding", "upgrade", "keep-alive", "proxy-connection"})


class NotForGrpc(ValueError):
    """An endpoint or header a gRPC destination cannot use; the message says why."""


@dataclass(frozen=True, slots=True)
class GrpcEndpoint:
    target: str  # host:port, as grpc channels take it
    tls: bool

    @property
    def host(self) -> str:
        """The host of the target (an IPv6 address without its brackets)."""
        return self.target.rpartition(":")[0].removeprefix("[").removesuffix("]")


def parse_grpc(value: str) -> GrpcEndpoint:
    tls = False
    rest = value
    for scheme, secure in _SCHEMES.items():
        if value.lower().startswith(scheme):
            tls, rest = secure, value[len(scheme):]
            break
    match = _HOST_PORT.match(rest)
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise NotForGrpc(
            f"a grpc endpoint is host:port, grpc://host:port or grpcs://host:port (TLS);"
            f" got {value!r}")
    return GrpcEndpoint(rest, tls)


def metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Headers as gRPC call metadata, or NotForGrpc naming the first that gRPC cannot carry."""
    usable, refused = split_metadata(headers)
    if refused:
        raise NotForGrpc(refused[0])
    return usable


def split_metadata(headers: dict[str, str]
                   ) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """The headers gRPC can carry, as metadata, and why each of the others cannot be.

    The router sends what it can of a row written before these rules (when gRPC destinations
    ignored their headers) rather than failing every delivery over one old header."""
    usable: dict[str, tuple[str, str]] = {}
    refused: list[str] = []
    for name, value in headers.items():
        key = name.lower()
        if not _METADATA_KEY.match(key):
            refused.append(f"header {name!r}: gRPC metadata names are letters, digits, '-',"
                           " '_' and '.'")
        elif key in RESERVED_METADATA or key.startswith("grpc-"):
            refused.append(f"header {name!r} is reserved by gRPC")
        elif key.endswith("-bin"):
            refused.append(f"header {name!r}: binary (-bin) metadata cannot be configured")
        elif not all(" " <= c <= "~" for c in value):
            refused.append(f"header {name!r}: gRPC metadata values are printable ASCII")
        elif key in usable:
            refused.append(f"headers {usable[key][0]!r} and {name!r} are one metadata key")
        else:
            usable[key] = (name, value)
    return tuple((key, value) for key, (_, value) in usable.items()), refused
