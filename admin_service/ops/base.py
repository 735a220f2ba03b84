"""What every concern of the service layer shares: the pool, the audit line, and the check
that a List call's filters name things that exist."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from admin_service import paging, validate
from jobsdb import catalog
from jobsdb.pool import transaction
from relayq.auth import Caller

log = logging.getLogger("relayq.admin")


Conn = AsyncConnection[Any]


class _Owned(Protocol):
    @property
    def id(self) -> str: ...


Owned = TypeVar("Owned", bound=_Owned)


class TenantPageRequest(Protocol):
    """A List request of things a tenant owns (sources, destinations)."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def page_size(self) -> int: ...
    @property
    def page_token(self) -> str: ...


class Concern:
    """One group of operations (tenants, jobs, ...), each taking the caller it acts for."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _owned_page(
        self, caller: Caller, request: TenantPageRequest, kind: str,
        read: Callable[[Conn, int | None, str | None, str, int], Awaitable[list[Owned]]],
    ) -> tuple[list[Owned], str]:
        """A page of what the caller may see, narrowed to one tenant when the request names
        one (another tenant's: PERMISSION_DENIED), in id order; and the next page's token."""
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        caller.check_tenant_filter(request.tenant_id)
        page = paging.read(kind, request.page_size, request.page_token)
        async with transaction(self._pool) as conn:
            await filters_exist(conn, caller, tenant_id=tenant_id)
            rows = await read(conn, caller.scope, tenant_id, page.after, page.limit)
        return rows, page.next_token(rows, lambda r: r.id)


def changed(caller: Caller, message: str, **fields: Any) -> None:
    """Every change is logged with who made it (job changes are also in job_statuses)."""
    log.info(message, extra={"actor": caller.actor, **fields})


async def filters_exist(conn: AsyncConnection[Any], caller: Caller, *,
                        tenant_id: str | None = None, source_id: str | None = None,
                        destination_id: str | None = None) -> None:
    """A List call filtered by something that does not exist is NOT_FOUND, as GetStats is,
    rather than an empty list that reads as "none yet"."""
    if tenant_id:
        await catalog.get_tenant(conn, tenant_id, caller.scope)
    if source_id:
        await catalog.get_source(conn, source_id, caller.scope)
    if destination_id:
        await catalog.get_destination(conn, destination_id, caller.scope)
