"""Destinations: where events go, with their policies, circuit and signing secrets."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from admin_service import convert, validate
from admin_service.ops.base import Concern, changed
from jobsdb import catalog
from jobsdb.pool import transaction
from relayq import destination_types
from relayq.auth import Caller
from relayq.netpolicy import NetworkPolicy
from relayq.rpc import FailedPrecondition
from relayq.v1 import admin_pb2

# How long replaced signing secrets keep signing: a day lets receivers deploy the new one.
DEFAULT_SIGNING_GRACE = 86_400


class Destinations(Concern):
    def __init__(self, pool: AsyncConnectionPool, policy: NetworkPolicy) -> None:
        super().__init__(pool)
        self._policy = policy

    async def create(self, caller: Caller, request: admin_pb2.CreateDestinationRequest
                     ) -> admin_pb2.DestinationConfig:
        tenant_id = caller.tenant_for(validate.object_id("tenant_id", request.tenant_id)
                                      if request.tenant_id or caller.is_operator else "")
        destination_id = validate.new_id("id", request.id, "dst")
        kind = validate.kind(request.type)
        policy = validate.retry_policy("retry_policy", request.retry_policy)
        rate = validate.rate_limit("rate_limit", request.rate_limit)
        circuit = validate.circuit_policy("circuit_policy", request.circuit_policy)
        batch = validate.batch_policy("batch_policy", kind, request.batch_policy)
        settings = catalog.DestinationSettings(
            name=validate.name("name", request.name),
            type=kind,
            endpoint=validate.endpoint("endpoint", kind, request.endpoint, self._policy),
            headers=validate.headers("headers", kind, dict(request.headers)),
            min_backoff_ms=policy.min_backoff_ms,
            max_backoff_ms=policy.max_backoff_ms,
            max_attempts=policy.max_attempts,
            max_retry_window_s=policy.max_retry_window_seconds,
            rate_per_second=rate.per_second,
            rate_burst=rate.burst,
            concurrency=validate.concurrency("concurrency", request.concurrency),
            timeout_ms=validate.timeout_ms("timeout_ms", request.timeout_ms),
            paused=request.paused,
            circuit_after_s=circuit.open_after_seconds,
            circuit_min_failures=circuit.min_failures,
            circuit_probe_s=circuit.probe_every_seconds,
            batch_max_events=batch.max_events,
            batch_max_bytes=batch.max_bytes,
            batch_linger_ms=batch.linger_ms,
        )
        async with transaction(self._pool) as conn:
            tenant = await catalog.get_tenant(conn, tenant_id, caller.scope)
            row = await catalog.create_destination(conn, tenant, destination_id, settings)
            secret = (await catalog.add_signing_secret(conn, row)
                      if destination_types.TYPES[kind].signed else "")
        changed(caller, "created destination", tenant=row.tenant_id, destination=row.id)
        answer = convert.destination(row)
        answer.signing_secret = secret
        return answer

    async def update(self, caller: Caller, request: admin_pb2.UpdateDestinationRequest
                     ) -> admin_pb2.DestinationConfig:
        destination_id = validate.reference("id", request.id)
        async with transaction(self._pool) as conn:
            current = await catalog.get_destination(conn, destination_id, caller.scope)
            changes = _changes(request, current, self._policy)
            row = await catalog.update_destination(conn, current, changes)
        changed(caller, "updated destination", tenant=row.tenant_id, destination=row.id,
                fields=sorted(changes))
        return convert.destination(row)

    async def get(self, caller: Caller, request: admin_pb2.GetDestinationRequest
                  ) -> admin_pb2.DestinationConfig:
        async with transaction(self._pool) as conn:
            return convert.destination(await catalog.get_destination(
                conn, validate.reference("id", request.id), caller.scope))

    async def list(self, caller: Caller, request: admin_pb2.ListDestinationsRequest
                   ) -> admin_pb2.ListDestinationsResponse:
        rows, token = await self._owned_page(caller, request, "destinations",
                                             catalog.list_destinations)
        return admin_pb2.ListDestinationsResponse(
            destinations=[convert.destination(r) for r in rows], next_page_token=token)

    async def set_circuit(self, caller: Caller, request: admin_pb2.SetCircuitRequest
                          ) -> admin_pb2.DestinationConfig:
        destination_id = validate.reference("destination_id", request.destination_id)
        reason = (validate.circuit_reason(request.reason) if request.open
                  else validate.reason(request.reason))
        async with transaction(self._pool) as conn:
            destination = await catalog.get_destination(conn, destination_id, caller.scope)
            await catalog.set_circuit(conn, destination, open_=request.open,
                                      reason=f"{reason} ({caller.actor})")
            row = await catalog.get_destination(conn, destination_id, caller.scope)
        changed(caller, "opened circuit" if request.open else "closed circuit",
                tenant=row.tenant_id, destination=row.id, reason=reason)
        return convert.destination(row)

    async def rotate_signing_secret(self, caller: Caller,
                                    request: admin_pb2.RotateSigningSecretRequest
                                    ) -> admin_pb2.RotateSigningSecretResponse:
        destination_id = validate.reference("destination_id", request.destination_id)
        grace = validate.grace_seconds(
            "grace_seconds",
            request.grace_seconds if request.HasField("grace_seconds") else None,
            default=DEFAULT_SIGNING_GRACE)
        async with transaction(self._pool) as conn:
            row = await catalog.get_destination(conn, destination_id, caller.scope)
            kind = destination_types.TYPES.get(row.type)
            if kind is None or not kind.signed:
                raise FailedPrecondition(
                    f"destination {row.id!r} is a {row.type} destination; only webhook"
                    " destinations sign their requests")
            secret, old_until = await catalog.rotate_signing_secret(conn, row, grace)
        changed(caller, "rotated signing secret", tenant=row.tenant_id, destination=row.id,
                grace_seconds=grace)
        return admin_pb2.RotateSigningSecretResponse(
            destination=convert.destination(row), signing_secret=secret,
            previous_expire_at=convert.timestamp(old_until))


def _changes(request: admin_pb2.UpdateDestinationRequest, current: catalog.Destination,
             networks: NetworkPolicy) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if request.HasField("name"):
        changes["name"] = validate.name("name", request.name)
    if request.HasField("endpoint"):
        changes["endpoint"] = validate.endpoint("endpoint", current.type, request.endpoint,
                                                networks)
    if request.HasField("retry_policy"):
        policy = validate.retry_policy("retry_policy", request.retry_policy)
        changes.update(min_backoff_ms=policy.min_backoff_ms,
                       max_backoff_ms=policy.max_backoff_ms,
                       max_attempts=policy.max_attempts,
                       max_retry_window_s=policy.max_retry_window_seconds)
    if request.HasField("rate_limit"):
        rate = validate.rate_limit("rate_limit", request.rate_limit)
        changes.update(rate_per_second=rate.per_second, rate_burst=rate.burst)
    if request.HasField("concurrency"):
        changes["concurrency"] = validate.concurrency("concurrency", request.concurrency)
    if request.HasField("timeout_ms"):
        changes["timeout_ms"] = validate.timeout_ms("timeout_ms", request.timeout_ms)
    if request.HasField("paused"):
        changes["paused"] = request.paused
    if request.HasField("circuit_policy"):
        circuit = validate.circuit_policy("circuit_policy", request.circuit_policy)
        changes.update(circuit_after_s=circuit.open_after_seconds,
                       circuit_min_failures=circuit.min_failures,
                       circuit_probe_s=circuit.probe_every_seconds)
    if request.HasField("batch_policy"):
        batch = validate.batch_policy("batch_policy", current.type, request.batch_policy)
        changes.update(batch_max_events=batch.max_events, batch_max_bytes=batch.max_bytes,
                       batch_linger_ms=batch.linger_ms)
    if request.headers or request.replace_headers:
        changes["headers"] = validate.headers_update(
            "headers", current.type, current.headers, dict(request.headers),
            replace=request.replace_headers)
    return changes
