"""Sources: where events come from, each with the write key ingest checks."""

from __future__ import annotations

from admin_service import convert, validate
from admin_service.ops.base import Concern, changed
from jobsdb import catalog
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.v1 import admin_pb2


class Sources(Concern):
    async def create(self, caller: Caller, request: admin_pb2.CreateSourceRequest
                     ) -> admin_pb2.SourceWithKey:
        tenant_id = caller.tenant_for(validate.object_id("tenant_id", request.tenant_id)
                                      if request.tenant_id or caller.is_operator else "")
        source_id = validate.new_id("id", request.id, "src")
        name = validate.name("name", request.name)
        limit = validate.rate_limit("rate_limit", request.rate_limit)
        if limit.per_second:
            caller.require_operator("a source's rate_limit")
        async with transaction(self._pool) as conn:
            tenant = await catalog.get_tenant(conn, tenant_id, caller.scope)
            row, write_key = await catalog.create_source(
                conn, tenant, source_id, name, rate_per_second=limit.per_second,
                rate_burst=limit.burst)
        changed(caller, "created source", tenant=row.tenant_id, source=row.id)
        return admin_pb2.SourceWithKey(source=convert.source(row), write_key=write_key)

    async def get(self, caller: Caller, request: admin_pb2.GetSourceRequest
                  ) -> admin_pb2.Source:
        async with transaction(self._pool) as conn:
            return convert.source(await catalog.get_source(
                conn, validate.reference("id", request.id), caller.scope))

    async def list(self, caller: Caller, request: admin_pb2.ListSourcesRequest
                   ) -> admin_pb2.ListSourcesResponse:
        rows, token = await self._owned_page(caller, request, "sources", catalog.list_sources)
        return admin_pb2.ListSourcesResponse(sources=[convert.source(r) for r in rows],
                                             next_page_token=token)

    async def rotate_write_key(self, caller: Caller, request: admin_pb2.RotateWriteKeyRequest
                               ) -> admin_pb2.SourceWithKey:
        source_id = validate.reference("source_id", request.source_id)
        validate.grace_seconds("grace_seconds", request.grace_seconds, default=0)
        async with transaction(self._pool) as conn:
            row = await catalog.get_source(conn, source_id, caller.scope)
            write_key = await catalog.rotate_write_key(conn, row, request.grace_seconds)
        changed(caller, "rotated write key", tenant=row.tenant_id, source=row.id,
                grace_seconds=request.grace_seconds)
        return admin_pb2.SourceWithKey(source=convert.source(row), write_key=write_key)

    async def update(self, caller: Caller, request: admin_pb2.UpdateSourceRequest
                     ) -> admin_pb2.Source:
        source_id = validate.reference("id", request.id)
        name = validate.name("name", request.name) if request.HasField("name") else None
        limit = (validate.rate_limit("rate_limit", request.rate_limit)
                 if request.HasField("rate_limit") else None)
        enabled = request.enabled if request.HasField("enabled") else None
        if limit is not None or enabled is not None:
            # The operator's levers on a runaway or compromised source: a tenant's token
            # (which may be the compromised part) must not be able to lift them.
            caller.require_operator("changing a source's enabled or rate_limit")
        async with transaction(self._pool) as conn:
            current = await catalog.get_source(conn, source_id, caller.scope)
            row = await catalog.update_source(
                conn, current, name=name, enabled=enabled,
                rate_per_second=limit.per_second if limit is not None else None,
                rate_burst=limit.burst if limit is not None else None)
        changed(caller, "updated source", tenant=row.tenant_id, source=row.id,
                fields=[f.name for f, _ in request.ListFields() if f.name != "id"])
        return convert.source(row)
