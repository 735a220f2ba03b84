"""GetStats: counts per state, oldest pending age and recent rates, per destination, tenant
and filtered connection."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from admin_service import convert, validate
from admin_service.ops.base import Concern
from jobsdb import catalog, eventlog
from jobsdb import jobs as jobsdb
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.v1 import admin_pb2


class Stats(Concern):
    async def get(self, caller: Caller, request: admin_pb2.GetStatsRequest
                  ) -> admin_pb2.GetStatsResponse:
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        destination_id = validate.optional_reference("destination_id", request.destination_id)
        caller.check_tenant_filter(request.tenant_id)
        async with transaction(self._pool) as conn:
            tenant_key = caller.scope
            if tenant_id:
                tenant_key = (await catalog.get_tenant(conn, tenant_id, caller.scope)).tenant_key
            destination_key = None
            if destination_id:
                destination_key = (await catalog.get_destination(
                    conn, destination_id, caller.scope)).destination_key
            rows = await jobsdb.stats(conn, tenant_key=tenant_key,
                                      destination_key=destination_key)
            connections = await jobsdb.connection_stats(conn, tenant_key=tenant_key,
                                                        destination_key=destination_key)
            # The log is every tenant's: its size is the operator's to see.
            log_size = (await eventlog.size(conn)
                        if caller.is_operator and not tenant_id and not destination_id
                        else None)
        response = await _stats(rows, connections)
        if log_size is not None:
            response.event_log.CopyFrom(convert.event_log(log_size))
        return response


# Destinations converted between two yields to the event loop: 10,000 of them take tens of
# milliseconds, which the admin's other calls (and the console's pages) should not wait out.
YIELD_EVERY = 500


async def _stats(rows: list[jobsdb.DestinationStatsRow],
                 connections: list[jobsdb.ConnectionStatsRow]) -> admin_pb2.GetStatsResponse:
    response = admin_pb2.GetStatsResponse()
    tenants: dict[str, admin_pb2.TenantStats] = defaultdict(admin_pb2.TenantStats)
    filtered: dict[int, int] = defaultdict(int)
    for connection in connections:
        filtered[connection.destination_key] += connection.filtered_out
        response.connections.append(admin_pb2.ConnectionStats(
            source_id=connection.source_id, destination_id=connection.destination_id,
            tenant_id=connection.tenant_id, filter=connection.filter,
            filtered_out=connection.filtered_out,
            filtered_out_per_second=connection.recent_filtered_out / 60))
    for i, row in enumerate(rows):
        if i and i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        oldest = float(row.oldest_pending_seconds or 0.0)
        delivered = float(row.recent_succeeded) / 60
        failed = float(row.recent_failed) / 60
        # Filled in place (add, not append: an appended message is copied), and the circuit
        # only when open: 10,000 destinations are a GetStats the console asks for often.
        stats = response.destinations.add(
            destination_id=row.destination_id, tenant_id=row.tenant_id,
            oldest_pending_seconds=oldest, delivered_per_second=delivered,
            failed_per_second=failed, paused=row.paused,
            filtered_out=filtered[row.destination_key])
        counts = stats.counts
        counts.pending, counts.failed, counts.waiting = row.pending, row.failed, row.waiting
        counts.succeeded, counts.aborted = int(row.succeeded), int(row.aborted)
        if row.circuit_opened_at is not None:
            stats.circuit.CopyFrom(convert.circuit(row.circuit_opened_at, row.circuit_reason))
        tenant = tenants[row.tenant_id]
        tenant.tenant_id = row.tenant_id
        tenant.filtered_out += filtered[row.destination_key]
        totals = tenant.counts
        totals.pending += row.pending
        totals.failed += row.failed
        totals.waiting += row.waiting
        totals.succeeded += int(row.succeeded)
        totals.aborted += int(row.aborted)
        tenant.oldest_pending_seconds = max(tenant.oldest_pending_seconds, oldest)
        tenant.delivered_per_second += delivered
        tenant.failed_per_second += failed
    response.tenants.extend(tenants[t] for t in sorted(tenants))
    return response
