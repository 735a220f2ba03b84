"""Reading the bearer credential from gRPC metadata."""

from __future__ import annotations

from typing import Any

import grpc


def bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The token of `authorization: Bearer <token>`, or None when absent or malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None
