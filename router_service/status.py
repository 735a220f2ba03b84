"""relayq.v1.RouterStatus: what this router owns and is doing, for operators and tests.

It names every tenant's destinations, so it asks for an admin token as the admin API does: the
operator token sees everything, a tenant token only its tenant's destinations.

Workers of one router service (RELAYQ_ROUTER_WORKERS) share its port, and whichever worker the
connection reached answers, for itself. So that one call still shows the whole service, every
answer lists every live router from Postgres, workers included, with the partitions each
holds: what they have in common is the database, not memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg_pool import AsyncConnectionPool

from jobsdb import leases
from jobsdb.pool import transaction
from relayq.auth import Authenticator
from relayq.rpc import handle_errors
from relayq.v1 import router_pb2, router_pb2_grpc
from router_service.engine import Engine


class RouterStatusServicer(router_pb2_grpc.RouterStatusServicer):
    def __init__(self, engine: Engine, auth: Authenticator, pool: AsyncConnectionPool) -> None:
        self._engine = engine
        self._auth = auth
        self._pool = pool

    @handle_errors
    async def GetStatus(
        self, request: router_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.GetStatusResponse:
        caller = await self._auth.caller(context)
        engine = self._engine
        membership = engine.membership
        response = router_pb2.GetStatusResponse(
            router_id=membership.router_id,
            partitions=sorted(membership.usable()),
            partition_count=membership.partition_count,
            lease_expires_at=_timestamp(
                datetime.now(UTC) + timedelta(seconds=membership.lease_remaining)),
        )
        for lane in engine.lanes.values():
            destination = lane.destination
            if not caller.is_operator and destination.tenant_id != caller.tenant_id:
                continue
            activity = router_pb2.DestinationActivity(
                destination_id=destination.id,
                tenant_id=destination.tenant_id,
                in_flight=lane.in_flight,
                queued=lane.queued,
                paused=destination.paused,
                rate_tokens=lane.rate.tokens if lane.rate.rate is not None else -1.0,
                circuit_open=lane.breaker.is_open,
            )
            if lane.last_pickup is not None:
                activity.last_pickup_at.CopyFrom(_timestamp(lane.last_pickup))
            response.destinations.append(activity)
        async with transaction(self._pool) as conn:
            for router in await leases.live_routers(conn):
                response.routers.append(router_pb2.RouterMember(
                    router_id=router.router_id, partitions=router.partitions,
                    started_at=_timestamp(router.started_at),
                    heartbeat_at=_timestamp(router.heartbeat_at)))
        return response


def _timestamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp
