"""relayq.v1.RouterStatus: what this router owns and is doing, for operators and tests.

It names every tenant's destinations, so it asks for an admin token as the admin API does: the
operator token sees everything, a tenant token only its tenant's destinations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from relayq.auth import Authenticator
from relayq.rpc import handle_errors
from relayq.v1 import router_pb2, router_pb2_grpc
from router_service.engine import Engine


class RouterStatusServicer(router_pb2_grpc.RouterStatusServicer):
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self._engine = engine
        self._auth = auth

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
        return response


def _timestamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp
