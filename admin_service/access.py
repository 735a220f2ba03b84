"""Who is calling: the operator, or a tenant-scoped token. Checked on every admin call.

The operator token comes from configuration and sees everything; tenant tokens live hashed in
admin_tokens and see only their tenant. The rules, used by every RPC:
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
from relayq.auth import bearer_token
from relayq.rpc import PermissionDenied, Unauthenticated


@dataclass(frozen=True, slots=True)
class Caller:
    # Recorded with every change: 'admin:operator' or 'admin:<token id>'.
    actor: str
    # None: the operator (every tenant). Otherwise the one tenant this caller may touch.
    scope: int | None
    tenant_id: str | None

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
    def __init__(self, pool: AsyncConnectionPool, operator_token: str) -> None:
        self._pool = pool
        self._operator = operator_token.encode()

    async def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        token = bearer_token(context)
        if token is None:
            raise Unauthenticated(
                "missing admin token: send metadata 'authorization: Bearer <token>'")
        if hmac.compare_digest(token.encode(), self._operator):
            return OPERATOR
        async with transaction(self._pool) as conn:
            owner = await catalog.token_owner(conn, token)
        if owner is None:
            raise Unauthenticated("unknown or revoked admin token")
        return Caller(f"admin:{owner.token_id}", owner.tenant_key, owner.tenant_id)
