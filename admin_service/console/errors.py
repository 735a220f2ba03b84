"""Errors of the service layer as HTTP statuses: the console's one mapping, beside
relayq.rpc's to gRPC codes (which it reuses: a page says what grpcurl would say)."""

from __future__ import annotations

import grpc

from relayq.rpc import status_of

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and the message to show for an error of an operation."""
    code, message, _ = status_of(exc)
    return _HTTP.get(code, 500), message
