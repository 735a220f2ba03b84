"""Connections: which source's events go to which destination, and through which filter."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection

from admin_service import convert, validate
from admin_service.ops import replays
from admin_service.ops.base import Concern, changed, filters_exist
from jobsdb import catalog
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.v1 import admin_pb2

_PairRequest = (admin_pb2.ConnectSourceRequest | admin_pb2.UpdateConnectionRequest
                | admin_pb2.DisconnectSourceRequest)


class Connections(Concern):
    async def connect(self, caller: Caller, request: admin_pb2.ConnectSourceRequest
                      ) -> admin_pb2.Connection:
        ids, event_filter = _pair_ids(request), _filter_given(request)
        backfill_from = request.backfill_from.strip()
        when = replays.parse_backfill_from(backfill_from) if backfill_from else None
        backfill_id = ""
        async with transaction(self._pool) as conn:
            source, destination = await _pair(conn, caller, ids)
            if source.tenant_key != destination.tenant_key:
                raise validate.bad("destination_id",
                                   "a source connects only to destinations of its own tenant")
            if backfill_from:
                await replays.check_backfill(conn, source, destination)
            row = await catalog.connect(conn, source, destination, event_filter)
            if backfill_from:
                backfill_id = await replays.start_backfill(conn, caller, source, destination,
                                                           when, backfill_from)
        changed(caller, "connected", tenant=source.tenant_id, source=source.id,
                destination=destination.id, filter=row.filter, backfill=backfill_id)
        connection = convert.connection(row)
        connection.backfill_id = backfill_id
        return connection

    async def update(self, caller: Caller, request: admin_pb2.UpdateConnectionRequest
                     ) -> admin_pb2.Connection:
        ids, event_filter = _pair_ids(request), _filter_given(request)
        async with transaction(self._pool) as conn:
            source, destination = await _pair(conn, caller, ids)
            if event_filter is None:
                return convert.connection(
                    await catalog.get_connection(conn, source, destination))
            row = await catalog.set_connection_filter(conn, source, destination, event_filter)
        changed(caller, "updated connection", tenant=source.tenant_id, source=source.id,
                destination=destination.id, filter=row.filter)
        return convert.connection(row)

    async def disconnect(self, caller: Caller, request: admin_pb2.DisconnectSourceRequest
                         ) -> admin_pb2.Connection:
        ids = _pair_ids(request)
        async with transaction(self._pool) as conn:
            source, destination = await _pair(conn, caller, ids)
            row = await catalog.disconnect(conn, source, destination)
        changed(caller, "disconnected", tenant=source.tenant_id, source=source.id,
                destination=destination.id)
        return convert.connection(row)

    async def list(self, caller: Caller, request: admin_pb2.ListConnectionsRequest
                   ) -> admin_pb2.ListConnectionsResponse:
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        source_id = validate.optional_reference("source_id", request.source_id)
        destination_id = validate.optional_reference("destination_id", request.destination_id)
        caller.check_tenant_filter(request.tenant_id)
        async with transaction(self._pool) as conn:
            await filters_exist(conn, caller, tenant_id=tenant_id, source_id=source_id,
                                destination_id=destination_id)
            rows = await catalog.list_connections(
                conn, caller.scope, tenant_id=tenant_id, source_id=source_id,
                destination_id=destination_id)
        return admin_pb2.ListConnectionsResponse(connections=[convert.connection(r)
                                                              for r in rows])


def _pair_ids(request: _PairRequest) -> tuple[str, str]:
    return (validate.reference("source_id", request.source_id),
            validate.reference("destination_id", request.destination_id))


def _filter_given(request: admin_pb2.ConnectSourceRequest | admin_pb2.UpdateConnectionRequest
                  ) -> str | None:
    """The connection filter a request sets, checked; None when it leaves it as it is."""
    return validate.event_filter("filter", request.filter) if request.HasField("filter") \
        else None


async def _pair(conn: AsyncConnection[Any], caller: Caller, ids: tuple[str, str]
                ) -> tuple[catalog.Source, catalog.Destination]:
    """The source and destination a connection request names, as the caller may see them."""
    return (await catalog.get_source(conn, ids[0], caller.scope),
            await catalog.get_destination(conn, ids[1], caller.scope))
