"""Who is calling: reading the bearer credential from gRPC metadata, and admin tokens.

The operator token comes from configuration (RELAYQ_ADMIN_TOKEN) and sees everything; tenant
tokens live hashed in admin_tokens and see only their tenant. Admin and the router's
RouterStatus check callers here; the rules:
  - no or unknown token: UNAUTHENTICATED;
  - a tenant token naming another tenant (tenant_id fields): PERMISSION_DENIED;
  - a tenant token naming another tenant's object (by its id): NOT_FOUND, as if it did not
    exist, so ids of other tenants cannot even be probed;
  - operator-only calls (creating tenants and tokens) with a tenant token: PERMISSION_DENIED.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

import grpc
from psycopg_pool import AsyncConnectionPool

from jobsdb import catalog
from jobsdb.pool import transaction
from relayq.config import ConfigError, Env
from relayq.rpc import PermissionDenied, Unauthenticated

# Short operator tokens are guessable; the admin API can abort every job.
MIN_OPERATOR_TOKEN_LENGTH = 16


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


def operator_token(env: Env, *, required: bool) -> str | None:
    """RELAYQ_ADMIN_TOKEN, checked; None when unset and not `required`."""
    token = env.text("RELAYQ_ADMIN_TOKEN", "")
    if not token:
        if not required:
            return None
        raise ConfigError("RELAYQ_ADMIN_TOKEN",
                          "not set; give the operator token admin callers must present")
    if len(token) < MIN_OPERATOR_TOKEN_LENGTH:
        raise ConfigError("RELAYQ_ADMIN_TOKEN",
                          f"too short; use at least {MIN_OPERATOR_TOKEN_LENGTH} characters")
    return token


@dataclass(frozen=True, slots=True)
class Caller:
    # Recorded with every change: 'admin:operator' or 'admin:<token id>'.
    actor: str
    # None: the operator (every tenant). Otherwise the one tenant this caller may touch.
    scope: int | None
    tenant_id: str | None
    # The tenant token's id (None: the operator).
    token_id: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.scope is None

    def require_operator(self, what: str) -> None:
        if not self.is_operator:
            raise PermissionDenied(f"{what} needs the operator token")

    def tenant_for(self, tenant_id: str) -> str:
        """The tenant a call acts on: the one asked for, or a tenant token's own when none is
        named. The operator must name one."""
        if self.is_operator:
            return tenant_id
        if tenant_id and tenant_id != self.tenant_id:
            raise PermissionDenied(f"this token may act only on tenant {self.tenant_id!r}")
        assert self.tenant_id is not None
        return self.tenant_id

    def check_tenant_filter(self, tenant_id: str) -> None:
        if tenant_id and not self.is_operator and tenant_id != self.tenant_id:
            raise PermissionDenied(f"this token may see only tenant {self.tenant_id!r}")


OPERATOR = Caller("admin:operator", None, None)


class Authenticator:
    """Admin and the router check callers the same way. Without an operator token configured
    (a router may run without one), only tenant tokens are accepted."""

    def __init__(self, pool: AsyncConnectionPool, operator_token: str | None) -> None:
        self._pool = pool
        self._operator = operator_token.encode() if operator_token else None

    async def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        token = bearer_token(context)
        if token is None:
            raise Unauthenticated(
                "missing admin token: send metadata 'authorization: Bearer <token>'")
        return await self.caller_for_token(token)

    async def caller_for_token(self, token: str) -> Caller:
        """Who presents `token`, however it came (call metadata, the console's sign-in)."""
        if self.is_operator_token(token):
            return OPERATOR
        async with transaction(self._pool) as conn:
            owner = await catalog.token_owner(conn, token)
        if owner is None:
            raise Unauthenticated("unknown or revoked admin token")
        return tenant_caller(owner.token_id, owner.tenant_key, owner.tenant_id)

    def is_operator_token(self, token: str) -> bool:
        return self._operator is not None and hmac.compare_digest(token.encode(),
                                                                  self._operator)


def tenant_caller(token_id: str, tenant_key: int, tenant_id: str) -> Caller:
    """The caller a tenant token makes, its id recorded with every change it makes."""
    return Caller(f"admin:{token_id}", tenant_key, tenant_id, token_id)
