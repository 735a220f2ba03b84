"""Tenants and their admin tokens: created by the operator, seen by their own tokens."""

from __future__ import annotations

from admin_service import convert, paging, validate
from admin_service.ops.base import Concern, changed, filters_exist
from jobsdb import catalog
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.v1 import admin_pb2


class Tenants(Concern):
    async def create(self, caller: Caller, request: admin_pb2.CreateTenantRequest
                     ) -> admin_pb2.Tenant:
        caller.require_operator("CreateTenant")
        tenant_id = validate.object_id("id", request.id)
        name = validate.name("name", request.name)
        async with transaction(self._pool) as conn:
            row = await catalog.create_tenant(conn, tenant_id, name)
        changed(caller, "created tenant", tenant=row.id)
        return convert.tenant(row)

    async def get(self, caller: Caller, request: admin_pb2.GetTenantRequest
                  ) -> admin_pb2.Tenant:
        async with transaction(self._pool) as conn:
            return convert.tenant(await catalog.get_tenant(
                conn, validate.reference("id", request.id), caller.scope))

    async def list(self, caller: Caller, request: admin_pb2.ListTenantsRequest
                   ) -> admin_pb2.ListTenantsResponse:
        page = paging.read("tenants", request.page_size, request.page_token)
        async with transaction(self._pool) as conn:
            rows = await catalog.list_tenants(conn, caller.scope, page.after, page.limit)
        return admin_pb2.ListTenantsResponse(
            tenants=[convert.tenant(r) for r in rows],
            next_page_token=page.next_token(rows, lambda r: r.id))


class AdminTokens(Concern):
    async def create(self, caller: Caller, request: admin_pb2.CreateAdminTokenRequest
                     ) -> admin_pb2.AdminTokenWithSecret:
        caller.require_operator("CreateAdminToken")
        tenant_id = validate.reference("tenant_id", request.tenant_id)
        name = validate.name("name", request.name)
        async with transaction(self._pool) as conn:
            tenant = await catalog.get_tenant(conn, tenant_id, None)
            row, secret = await catalog.create_admin_token(
                conn, tenant, validate.new_id("id", "", "tok"), name)
        changed(caller, "created admin token", tenant=row.tenant_id, token=row.id)
        return admin_pb2.AdminTokenWithSecret(token=convert.admin_token(row), secret=secret)

    async def list(self, caller: Caller, request: admin_pb2.ListAdminTokensRequest
                   ) -> admin_pb2.ListAdminTokensResponse:
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        caller.check_tenant_filter(request.tenant_id)
        async with transaction(self._pool) as conn:
            await filters_exist(conn, caller, tenant_id=tenant_id)
            rows = await catalog.list_admin_tokens(conn, caller.scope, tenant_id=tenant_id)
        return admin_pb2.ListAdminTokensResponse(tokens=[convert.admin_token(r) for r in rows])

    async def revoke(self, caller: Caller, request: admin_pb2.RevokeAdminTokenRequest
                     ) -> admin_pb2.AdminToken:
        caller.require_operator("RevokeAdminToken")
        token_id = validate.reference("id", request.id)
        async with transaction(self._pool) as conn:
            row = await catalog.revoke_admin_token(conn, token_id)
        changed(caller, "revoked admin token", tenant=row.tenant_id, token=row.id)
        return convert.admin_token(row)
