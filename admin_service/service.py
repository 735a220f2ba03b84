"""The relayq.v1.Admin servicer: authenticate, validate, one transaction, answer.

Each method reads the caller first (relayq/auth.py), checks the request (validate.py), and does its
work in one jobsdb transaction; errors leave through relayq.rpc.handle_errors, the one place
that maps them to gRPC statuses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from admin_service import convert, metrics, validate
from filterlang.errors import FilterError
from jobsdb import catalog, subscriptions
from jobsdb import errors as dberrors
from jobsdb import jobs as jobsdb
from jobsdb.filters import compile_filter
from jobsdb.pool import transaction
from relayq import destination_types
from relayq.auth import Authenticator, Caller
from relayq.netpolicy import NetworkPolicy
from relayq.rpc import FailedPrecondition, InvalidArgument, handle_errors
from relayq.v1 import admin_pb2, admin_pb2_grpc, common_pb2

log = logging.getLogger("relayq.admin")

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE = 100
# Runs of a job change that Postgres rolls back to break a deadlock, before giving up.
CONFLICT_ATTEMPTS = 4
DEFAULT_PEEK = 20
# How long replaced signing secrets keep signing: a day lets receivers deploy the new one.
DEFAULT_SIGNING_GRACE = 86_400


def selection(text: str) -> jobsdb.Selection:
    """An operator's filter as a jobs selection; a malformed one is INVALID_ARGUMENT naming
    the position and what was expected."""
    try:
        compiled = compile_filter(text)
    except FilterError as exc:
        raise InvalidArgument(f"filter: {exc.message}",
                              violations=[("filter", exc.message)]) from None
    if compiled is None:
        return jobsdb.EVERYTHING
    return jobsdb.Selection(compiled.where, tuple(compiled.params),
                            subscriptions.states(compiled.node))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, pool: AsyncConnectionPool, auth: Authenticator,
                 policy: NetworkPolicy | None = None) -> None:
        self._pool = pool
        # Where destinations may connect: endpoints written as refused addresses are refused.
        self._policy = policy or NetworkPolicy()
        self._auth = auth

    # --- tenants -------------------------------------------------------------------------

    @handle_errors
    async def CreateTenant(self, request: admin_pb2.CreateTenantRequest, context: Context
                           ) -> admin_pb2.Tenant:
        caller = await self._auth.caller(context)
        caller.require_operator("CreateTenant")
        tenant_id = validate.object_id("id", request.id)
        name = validate.name("name", request.name)
        async with transaction(self._pool) as conn:
            row = await catalog.create_tenant(conn, tenant_id, name)
        _changed(caller, "created tenant", tenant=row.id)
        return convert.tenant(row)

    @handle_errors
    async def GetTenant(self, request: admin_pb2.GetTenantRequest, context: Context
                        ) -> admin_pb2.Tenant:
        caller = await self._auth.caller(context)
        async with transaction(self._pool) as conn:
            return convert.tenant(await catalog.get_tenant(
                conn, validate.reference("id", request.id), caller.scope))

    @handle_errors
    async def ListTenants(self, request: admin_pb2.ListTenantsRequest, context: Context
                          ) -> admin_pb2.ListTenantsResponse:
        caller = await self._auth.caller(context)
        limit = validate.page_size("page_size", request.page_size, DEFAULT_PAGE)
        after = validate.read_page_token("page_token", "tenants", request.page_token)
        async with transaction(self._pool) as conn:
            rows = await catalog.list_tenants(conn, caller.scope, after, limit)
        return admin_pb2.ListTenantsResponse(
            tenants=[convert.tenant(r) for r in rows],
            next_page_token=_next(rows, limit, "tenants", lambda r: r.id))

    # --- sources -------------------------------------------------------------------------

    @handle_errors
    async def CreateSource(self, request: admin_pb2.CreateSourceRequest, context: Context
                           ) -> admin_pb2.SourceWithKey:
        caller = await self._auth.caller(context)
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
        _changed(caller, "created source", tenant=row.tenant_id, source=row.id)
        return admin_pb2.SourceWithKey(source=convert.source(row), write_key=write_key)

    @handle_errors
    async def GetSource(self, request: admin_pb2.GetSourceRequest, context: Context
                        ) -> admin_pb2.Source:
        caller = await self._auth.caller(context)
        async with transaction(self._pool) as conn:
            return convert.source(await catalog.get_source(
                conn, validate.reference("id", request.id), caller.scope))

    @handle_errors
    async def ListSources(self, request: admin_pb2.ListSourcesRequest, context: Context
                          ) -> admin_pb2.ListSourcesResponse:
        caller = await self._auth.caller(context)
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        caller.check_tenant_filter(request.tenant_id)
        limit = validate.page_size("page_size", request.page_size, DEFAULT_PAGE)
        after = validate.read_page_token("page_token", "sources", request.page_token)
        async with transaction(self._pool) as conn:
            await _filters_exist(conn, caller, tenant_id=tenant_id)
            rows = await catalog.list_sources(conn, caller.scope, tenant_id, after, limit)
        return admin_pb2.ListSourcesResponse(
            sources=[convert.source(r) for r in rows],
            next_page_token=_next(rows, limit, "sources", lambda r: r.id))

    @handle_errors
    async def RotateWriteKey(self, request: admin_pb2.RotateWriteKeyRequest, context: Context
                             ) -> admin_pb2.SourceWithKey:
        caller = await self._auth.caller(context)
        source_id = validate.reference("source_id", request.source_id)
        validate.grace_seconds("grace_seconds", request.grace_seconds, default=0)
        async with transaction(self._pool) as conn:
            row = await catalog.get_source(conn, source_id, caller.scope)
            write_key = await catalog.rotate_write_key(conn, row, request.grace_seconds)
        _changed(caller, "rotated write key", tenant=row.tenant_id, source=row.id,
                 grace_seconds=request.grace_seconds)
        return admin_pb2.SourceWithKey(source=convert.source(row), write_key=write_key)

    @handle_errors
    async def UpdateSource(self, request: admin_pb2.UpdateSourceRequest, context: Context
                           ) -> admin_pb2.Source:
        caller = await self._auth.caller(context)
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
        _changed(caller, "updated source", tenant=row.tenant_id, source=row.id,
                 fields=[f.name for f, _ in request.ListFields() if f.name != "id"])
        return convert.source(row)

    # --- destinations --------------------------------------------------------------------

    @handle_errors
    async def CreateDestination(self, request: admin_pb2.CreateDestinationRequest,
                                context: Context) -> admin_pb2.DestinationConfig:
        caller = await self._auth.caller(context)
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
        _changed(caller, "created destination", tenant=row.tenant_id, destination=row.id)
        answer = convert.destination(row)
        answer.signing_secret = secret
        return answer

    @handle_errors
    async def UpdateDestination(self, request: admin_pb2.UpdateDestinationRequest,
                                context: Context) -> admin_pb2.DestinationConfig:
        caller = await self._auth.caller(context)
        destination_id = validate.reference("id", request.id)
        async with transaction(self._pool) as conn:
            current = await catalog.get_destination(conn, destination_id, caller.scope)
            changes = _destination_changes(request, current, self._policy)
            row = await catalog.update_destination(conn, current, changes)
        _changed(caller, "updated destination", tenant=row.tenant_id, destination=row.id,
                 fields=sorted(changes))
        return convert.destination(row)

    @handle_errors
    async def GetDestination(self, request: admin_pb2.GetDestinationRequest, context: Context
                             ) -> admin_pb2.DestinationConfig:
        caller = await self._auth.caller(context)
        async with transaction(self._pool) as conn:
            return convert.destination(await catalog.get_destination(
                conn, validate.reference("id", request.id), caller.scope))

    @handle_errors
    async def ListDestinations(self, request: admin_pb2.ListDestinationsRequest,
                               context: Context) -> admin_pb2.ListDestinationsResponse:
        caller = await self._auth.caller(context)
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        caller.check_tenant_filter(request.tenant_id)
        limit = validate.page_size("page_size", request.page_size, DEFAULT_PAGE)
        after = validate.read_page_token("page_token", "destinations", request.page_token)
        async with transaction(self._pool) as conn:
            await _filters_exist(conn, caller, tenant_id=tenant_id)
            rows = await catalog.list_destinations(conn, caller.scope, tenant_id, after, limit)
        return admin_pb2.ListDestinationsResponse(
            destinations=[convert.destination(r) for r in rows],
            next_page_token=_next(rows, limit, "destinations", lambda r: r.id))

    @handle_errors
    async def SetCircuit(self, request: admin_pb2.SetCircuitRequest, context: Context
                         ) -> admin_pb2.DestinationConfig:
        caller = await self._auth.caller(context)
        destination_id = validate.reference("destination_id", request.destination_id)
        reason = (validate.circuit_reason(request.reason) if request.open
                  else validate.reason(request.reason))
        async with transaction(self._pool) as conn:
            destination = await catalog.get_destination(conn, destination_id, caller.scope)
            await catalog.set_circuit(conn, destination, open_=request.open,
                                      reason=f"{reason} ({caller.actor})")
            row = await catalog.get_destination(conn, destination_id, caller.scope)
        _changed(caller, "opened circuit" if request.open else "closed circuit",
                 tenant=row.tenant_id, destination=row.id, reason=reason)
        return convert.destination(row)

    @handle_errors
    async def RotateSigningSecret(self, request: admin_pb2.RotateSigningSecretRequest,
                                  context: Context) -> admin_pb2.RotateSigningSecretResponse:
        caller = await self._auth.caller(context)
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
        _changed(caller, "rotated signing secret", tenant=row.tenant_id, destination=row.id,
                 grace_seconds=grace)
        return admin_pb2.RotateSigningSecretResponse(
            destination=convert.destination(row), signing_secret=secret,
            previous_expire_at=convert.timestamp(old_until))

    # --- connections ---------------------------------------------------------------------

    @handle_errors
    async def ConnectSource(self, request: admin_pb2.ConnectSourceRequest, context: Context
                            ) -> admin_pb2.Connection:
        caller = await self._auth.caller(context)
        ids, event_filter = _pair_ids(request), _filter_given(request)
        async with transaction(self._pool) as conn:
            source, destination = await _pair(conn, caller, ids)
            if source.tenant_key != destination.tenant_key:
                raise validate.bad("destination_id",
                                   "a source connects only to destinations of its own tenant")
            row = await catalog.connect(conn, source, destination, event_filter)
        _changed(caller, "connected", tenant=source.tenant_id, source=source.id,
                 destination=destination.id, filter=row.filter)
        return convert.connection(row)

    @handle_errors
    async def UpdateConnection(self, request: admin_pb2.UpdateConnectionRequest,
                               context: Context) -> admin_pb2.Connection:
        caller = await self._auth.caller(context)
        ids, event_filter = _pair_ids(request), _filter_given(request)
        async with transaction(self._pool) as conn:
            source, destination = await _pair(conn, caller, ids)
            if event_filter is None:
                return convert.connection(
                    await catalog.get_connection(conn, source, destination))
            row = await catalog.set_connection_filter(conn, source, destination, event_filter)
        _changed(caller, "updated connection", tenant=source.tenant_id, source=source.id,
                 destination=destination.id, filter=row.filter)
        return convert.connection(row)

    @handle_errors
    async def DisconnectSource(self, request: admin_pb2.DisconnectSourceRequest,
                               context: Context) -> admin_pb2.Connection:
        caller = await self._auth.caller(context)
        ids = _pair_ids(request)
        async with transaction(self._pool) as conn:
            source, destination = await _pair(conn, caller, ids)
            row = await catalog.disconnect(conn, source, destination)
        _changed(caller, "disconnected", tenant=source.tenant_id, source=source.id,
                 destination=destination.id)
        return convert.connection(row)

    @handle_errors
    async def ListConnections(self, request: admin_pb2.ListConnectionsRequest,
                              context: Context) -> admin_pb2.ListConnectionsResponse:
        caller = await self._auth.caller(context)
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        source_id = validate.optional_reference("source_id", request.source_id)
        destination_id = validate.optional_reference("destination_id", request.destination_id)
        caller.check_tenant_filter(request.tenant_id)
        async with transaction(self._pool) as conn:
            await _filters_exist(conn, caller, tenant_id=tenant_id, source_id=source_id,
                                 destination_id=destination_id)
            rows = await catalog.list_connections(
                conn, caller.scope, tenant_id=tenant_id, source_id=source_id,
                destination_id=destination_id)
        return admin_pb2.ListConnectionsResponse(connections=[convert.connection(r)
                                                              for r in rows])

    # --- admin tokens --------------------------------------------------------------------

    @handle_errors
    async def CreateAdminToken(self, request: admin_pb2.CreateAdminTokenRequest,
                               context: Context) -> admin_pb2.AdminTokenWithSecret:
        caller = await self._auth.caller(context)
        caller.require_operator("CreateAdminToken")
        tenant_id = validate.reference("tenant_id", request.tenant_id)
        name = validate.name("name", request.name)
        async with transaction(self._pool) as conn:
            tenant = await catalog.get_tenant(conn, tenant_id, None)
            row, secret = await catalog.create_admin_token(
                conn, tenant, validate.new_id("id", "", "tok"), name)
        _changed(caller, "created admin token", tenant=row.tenant_id, token=row.id)
        return admin_pb2.AdminTokenWithSecret(token=convert.admin_token(row), secret=secret)

    @handle_errors
    async def ListAdminTokens(self, request: admin_pb2.ListAdminTokensRequest,
                              context: Context) -> admin_pb2.ListAdminTokensResponse:
        caller = await self._auth.caller(context)
        tenant_id = validate.optional_reference("tenant_id", request.tenant_id)
        caller.check_tenant_filter(request.tenant_id)
        async with transaction(self._pool) as conn:
            await _filters_exist(conn, caller, tenant_id=tenant_id)
            rows = await catalog.list_admin_tokens(conn, caller.scope, tenant_id=tenant_id)
        return admin_pb2.ListAdminTokensResponse(tokens=[convert.admin_token(r) for r in rows])

    @handle_errors
    async def RevokeAdminToken(self, request: admin_pb2.RevokeAdminTokenRequest,
                               context: Context) -> admin_pb2.AdminToken:
        caller = await self._auth.caller(context)
        caller.require_operator("RevokeAdminToken")
        token_id = validate.reference("id", request.id)
        async with transaction(self._pool) as conn:
            row = await catalog.revoke_admin_token(conn, token_id)
        _changed(caller, "revoked admin token", tenant=row.tenant_id, token=row.id)
        return convert.admin_token(row)

    # --- jobs ----------------------------------------------------------------------------

    @handle_errors
    async def ListJobs(self, request: admin_pb2.ListJobsRequest, context: Context
                       ) -> admin_pb2.ListJobsResponse:
        caller = await self._auth.caller(context)
        limit = validate.page_size("page_size", request.page_size, DEFAULT_PAGE)
        after = validate.job_page_token(request.page_token)
        chosen = selection(request.filter)
        async with transaction(self._pool) as conn:
            rows = await jobsdb.list_jobs(conn, chosen, caller.scope, after=after, limit=limit,
                                          include_payload=request.include_payload)
        return admin_pb2.ListJobsResponse(
            jobs=[convert.job(r) for r in rows],
            next_page_token=_next(rows, limit, "jobs", lambda r: str(r.job_id)))

    @handle_errors
    async def GetJob(self, request: admin_pb2.GetJobRequest, context: Context
                     ) -> common_pb2.Job:
        caller = await self._auth.caller(context)
        if request.job_id <= 0:
            raise validate.bad("job_id", "required (a positive job id)")
        async with transaction(self._pool) as conn:
            row, history = await jobsdb.get_job(conn, request.job_id, caller.scope)
        return convert.job(row, history)

    @handle_errors
    async def PeekJobs(self, request: admin_pb2.PeekJobsRequest, context: Context
                       ) -> admin_pb2.PeekJobsResponse:
        caller = await self._auth.caller(context)
        destination_id = validate.reference("destination_id", request.destination_id)
        limit = validate.page_size("limit", request.limit, DEFAULT_PEEK)
        async with transaction(self._pool) as conn:
            destination = await catalog.get_destination(conn, destination_id, caller.scope)
            rows = await jobsdb.peek(conn, destination.destination_key, limit)
            now = await _now(conn)
        return admin_pb2.PeekJobsResponse(jobs=[
            _peeked(row, destination.paused, now) for row in rows])

    @handle_errors
    async def RetryJobs(self, request: admin_pb2.RetryJobsRequest, context: Context
                        ) -> admin_pb2.ChangeJobsResponse:
        return await self._change_jobs("retry", request, context, "retried by an operator",
                                       functools.partial(jobsdb.retry, replay=request.replay))

    @handle_errors
    async def AbortJobs(self, request: admin_pb2.AbortJobsRequest, context: Context
                        ) -> admin_pb2.ChangeJobsResponse:
        return await self._change_jobs("abort", request, context, "aborted by an operator",
                                       jobsdb.abort)

    async def _change_jobs(self, action: str,
                           request: admin_pb2.RetryJobsRequest | admin_pb2.AbortJobsRequest,
                           context: Context, default_reason: str,
                           change: Callable[..., Awaitable[jobsdb.Change]]
                           ) -> admin_pb2.ChangeJobsResponse:
        """Count what the selector matches among the jobs the action applies to and, unless
        it is a dry run, change them in the same statement, saying who did it and why."""
        caller = await self._auth.caller(context)
        chosen = _selector(request.selector)
        reason = validate.reason(request.reason) or default_reason
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                async with transaction(self._pool) as conn:
                    done = await change(conn, chosen, caller.scope, actor=caller.actor,
                                        reason=reason, apply=not request.dry_run)
                break
            except dberrors.Conflict:
                # A router's flush locks a job after counting into the row this change also
                # counts into: Postgres breaks the cycle by rolling one back. Nothing of it
                # happened, and the compare-and-set makes running it again safe.
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("job change rolled back by a lock conflict; running it again",
                         extra={"attempt": attempt})
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
        if request.dry_run:
            return admin_pb2.ChangeJobsResponse(matched=done.matched, dry_run=True)
        metrics.JOB_CHANGES.labels(action).inc(done.changed)
        _changed(caller, f"{action} jobs", count=done.changed, reason=reason)
        return admin_pb2.ChangeJobsResponse(matched=done.matched, changed=done.changed)

    @handle_errors
    async def GetStats(self, request: admin_pb2.GetStatsRequest, context: Context
                       ) -> admin_pb2.GetStatsResponse:
        caller = await self._auth.caller(context)
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
        return _stats(rows, connections)


async def _filters_exist(conn: AsyncConnection[Any], caller: Caller, *,
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


_PairRequest = (admin_pb2.ConnectSourceRequest | admin_pb2.UpdateConnectionRequest
                | admin_pb2.DisconnectSourceRequest)


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


def _selector(request_selector: admin_pb2.JobSelector) -> jobsdb.Selection:
    ids, text = validate.selector(request_selector)
    return jobsdb.by_ids(ids) if ids else selection(text)


def _destination_changes(request: admin_pb2.UpdateDestinationRequest,
                         current: catalog.Destination, networks: NetworkPolicy
                         ) -> dict[str, Any]:
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


def _next(rows: list[Any], limit: int, kind: str, key: Any) -> str:
    """A token for the next page when this one is full (the next may still be empty)."""
    return validate.page_token(kind, key(rows[-1])) if len(rows) == limit else ""


async def _now(conn: Any) -> Any:
    cur = await conn.execute("SELECT now()")
    row = await cur.fetchone()
    return row[0]


def _peeked(row: jobsdb.PeekedRow, paused: bool, now: Any) -> admin_pb2.PeekedJob:
    job = row.job
    reason = ""
    if row.holder is not None:
        reason = f"waiting behind job {row.holder}"
    elif job.state == "failed" and job.retry_at is not None and job.retry_at > now:
        reason = f"retry at {job.retry_at.isoformat()}"
    elif paused:
        reason = "destination paused"
    return admin_pb2.PeekedJob(job=convert.job(job), runnable=not reason,
                               blocked_by=row.holder or 0, blocked_reason=reason)


def _stats(rows: list[jobsdb.DestinationStatsRow],
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
    for row in rows:
        counts = common_counts(row)
        oldest = float(row.oldest_pending_seconds or 0.0)
        delivered = float(row.recent_succeeded) / 60
        failed = float(row.recent_failed) / 60
        response.destinations.append(admin_pb2.DestinationStats(
            destination_id=row.destination_id, tenant_id=row.tenant_id, counts=counts,
            oldest_pending_seconds=oldest, delivered_per_second=delivered,
            failed_per_second=failed, paused=row.paused,
            circuit=convert.circuit(row.circuit_opened_at, row.circuit_reason),
            filtered_out=filtered[row.destination_key]))
        tenant = tenants[row.tenant_id]
        tenant.tenant_id = row.tenant_id
        tenant.filtered_out += filtered[row.destination_key]
        for field in ("pending", "failed", "waiting", "succeeded", "aborted"):
            setattr(tenant.counts, field, getattr(tenant.counts, field) + getattr(counts, field))
        tenant.oldest_pending_seconds = max(tenant.oldest_pending_seconds, oldest)
        tenant.delivered_per_second += delivered
        tenant.failed_per_second += failed
    response.tenants.extend(tenants[t] for t in sorted(tenants))
    return response


def common_counts(row: jobsdb.DestinationStatsRow) -> admin_pb2.StateCounts:
    return admin_pb2.StateCounts(pending=row.pending, failed=row.failed, waiting=row.waiting,
                                 succeeded=int(row.succeeded), aborted=int(row.aborted))


def _changed(caller: Caller, message: str, **fields: Any) -> None:
    """Every change is logged with who made it (job changes are also in job_statuses)."""
    log.info(message, extra={"actor": caller.actor, **fields})
