"""Access control of relayq-admin: every RPC with no token, a wrong token, another tenant's
token, the tenant's own token and the operator's; statuses, and nothing of another tenant in
any answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from psycopg import AsyncConnection

from relayq.v1 import admin_pb2, common_pb2
from tests.helpers import event
from tests.pipeline import World, send
from tests.services import OPERATOR_TOKEN, Admin, admin, ingest

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class Setup:
    admin: Admin
    acme_token: str
    beta_token: str
    acme_job: int
    acme_token_id: str
    acme_replay: str


@pytest.fixture
async def setup(world: World) -> AsyncIterator[Setup]:
    """Tenant 'acme' (the world's, with a destination and a job) and tenant 'beta'."""
    await world.destination("acme-hook", paused=True)
    # A filter that keeps m2 out: acme's connection shows in GetStats with its filter and
    # count, which beta must never see.
    await world.conn.execute("UPDATE connections SET event_filter = 'properties.n = 1'")
    async with ingest(world.database) as service, admin(world.database) as adm:
        [job_id] = await send(service, world.source, [event("m1", "alice"),
                                                      event("m2", "alice", n=2)])
        auth = Admin.auth()
        await adm.stub.CreateTenant(admin_pb2.CreateTenantRequest(id="beta"), metadata=auth)
        await adm.stub.CreateSource(admin_pb2.CreateSourceRequest(id="beta-web",
                                                                  tenant_id="beta"),
                                    metadata=auth)
        await adm.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="beta-hook", tenant_id="beta", type="grpc", endpoint="127.0.0.1:9"),
            metadata=auth)
        tokens = [await adm.stub.CreateAdminToken(admin_pb2.CreateAdminTokenRequest(
            tenant_id=tenant, name="ops"), metadata=auth) for tenant in ("acme", "beta")]
        replayed = await adm.stub.ReplayEvents(admin_pb2.ReplayEventsRequest(
            source_id="web", destination_id="acme-hook", reason="setup"), metadata=auth)
        yield Setup(adm, tokens[0].secret, tokens[1].secret, job_id, tokens[0].token.id,
                    replayed.replay.replay_id)


@dataclass(frozen=True)
class Case:
    method: str
    request: Callable[[Setup], Any]
    # Status with another tenant's token; OK means "answers, but shows nothing of acme".
    other_tenant: grpc.StatusCode
    # Status with acme's own token (operator-only calls are denied to tenants).
    own_tenant: grpc.StatusCode = OK


def _sel(s: Setup) -> admin_pb2.JobSelector:
    return admin_pb2.JobSelector(job_ids=[s.acme_job])


CASES = [
    Case("CreateTenant", lambda s: admin_pb2.CreateTenantRequest(id="gamma"), DENIED, DENIED),
    Case("GetTenant", lambda s: admin_pb2.GetTenantRequest(id="acme"), NOT_FOUND),
    Case("ListTenants", lambda s: admin_pb2.ListTenantsRequest(), OK),
    Case("CreateSource", lambda s: admin_pb2.CreateSourceRequest(tenant_id="acme"), DENIED),
    Case("GetSource", lambda s: admin_pb2.GetSourceRequest(id="web"), NOT_FOUND),
    Case("ListSources", lambda s: admin_pb2.ListSourcesRequest(), OK),
    Case("ListSources", lambda s: admin_pb2.ListSourcesRequest(tenant_id="acme"), DENIED),
    Case("RotateWriteKey", lambda s: admin_pb2.RotateWriteKeyRequest(source_id="web",
                                                                     grace_seconds=60),
         NOT_FOUND),
    Case("UpdateSource", lambda s: admin_pb2.UpdateSourceRequest(id="web", name="Web"),
         NOT_FOUND),
    # Disabling and limiting are the operator's levers: a tenant's token can not lift them.
    Case("UpdateSource", lambda s: admin_pb2.UpdateSourceRequest(
        id="web", enabled=True, rate_limit=common_pb2.RateLimit(per_second=5)), DENIED, DENIED),
    Case("CreateDestination", lambda s: admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="127.0.0.1:9"), DENIED),
    Case("UpdateDestination", lambda s: admin_pb2.UpdateDestinationRequest(
        id="acme-hook", concurrency=3), NOT_FOUND),
    Case("GetDestination", lambda s: admin_pb2.GetDestinationRequest(id="acme-hook"),
         NOT_FOUND),
    Case("ListDestinations", lambda s: admin_pb2.ListDestinationsRequest(), OK),
    Case("SetCircuit", lambda s: admin_pb2.SetCircuitRequest(
        destination_id="acme-hook", open=True, reason="maintenance"), NOT_FOUND),
    Case("RotateSigningSecret", lambda s: admin_pb2.RotateSigningSecretRequest(
        destination_id="acme-hook", grace_seconds=60), NOT_FOUND),
    Case("ConnectSource", lambda s: admin_pb2.ConnectSourceRequest(
        source_id="web", destination_id="acme-hook"), NOT_FOUND),
    Case("ConnectSource", lambda s: admin_pb2.ConnectSourceRequest(
        source_id="web", destination_id="acme-hook", filter="type = 'track'"), NOT_FOUND),
    Case("UpdateConnection", lambda s: admin_pb2.UpdateConnectionRequest(
        source_id="web", destination_id="acme-hook", filter="event = 'Order Completed'"),
         NOT_FOUND),
    Case("UpdateConnection", lambda s: admin_pb2.UpdateConnectionRequest(
        source_id="web", destination_id="acme-hook"), NOT_FOUND),
    Case("DisconnectSource", lambda s: admin_pb2.DisconnectSourceRequest(
        source_id="web", destination_id="acme-hook"), NOT_FOUND),
    Case("ListConnections", lambda s: admin_pb2.ListConnectionsRequest(), OK),
    Case("CreateAdminToken", lambda s: admin_pb2.CreateAdminTokenRequest(tenant_id="acme"),
         DENIED, DENIED),
    Case("ListAdminTokens", lambda s: admin_pb2.ListAdminTokensRequest(), OK),
    Case("ListAdminTokens", lambda s: admin_pb2.ListAdminTokensRequest(tenant_id="acme"),
         DENIED),
    Case("RevokeAdminToken", lambda s: admin_pb2.RevokeAdminTokenRequest(id=s.acme_token_id),
         DENIED, DENIED),
    Case("ListJobs", lambda s: admin_pb2.ListJobsRequest(filter="tenant = 'acme'",
                                                         include_payload=True), OK),
    Case("GetJob", lambda s: admin_pb2.GetJobRequest(job_id=s.acme_job), NOT_FOUND),
    Case("PeekJobs", lambda s: admin_pb2.PeekJobsRequest(destination_id="acme-hook"),
         NOT_FOUND),
    Case("RetryJobs", lambda s: admin_pb2.RetryJobsRequest(selector=_sel(s), dry_run=True), OK),
    Case("AbortJobs", lambda s: admin_pb2.AbortJobsRequest(selector=_sel(s)), OK),
    Case("GetStats", lambda s: admin_pb2.GetStatsRequest(), OK),
    Case("GetStats", lambda s: admin_pb2.GetStatsRequest(tenant_id="acme"), DENIED),
    Case("GetStats", lambda s: admin_pb2.GetStatsRequest(destination_id="acme-hook"),
         NOT_FOUND),
    Case("ReplayEvents", lambda s: admin_pb2.ReplayEventsRequest(
        source_id="web", destination_id="acme-hook", dry_run=True), NOT_FOUND),
    Case("ListReplays", lambda s: admin_pb2.ListReplaysRequest(), OK),
    Case("GetReplay", lambda s: admin_pb2.GetReplayRequest(replay_id=s.acme_replay), NOT_FOUND),
    Case("CancelReplay", lambda s: admin_pb2.CancelReplayRequest(replay_id=s.acme_replay),
         NOT_FOUND),
    # Another tenant's source or event is NOT_FOUND (never shown, nor said to exist), as
    # GetJob's jobs are.
    Case("ListEvents", lambda s: admin_pb2.ListEventsRequest(source_id="web",
                                                             include_payload=True), NOT_FOUND),
    Case("GetEvent", lambda s: admin_pb2.GetEventRequest(event_id=s.acme_job >> 16),
         NOT_FOUND),
    Case("GetEvent", lambda s: admin_pb2.GetEventRequest(source_id="web", message_id="m1"),
         NOT_FOUND),
]


def test_every_admin_rpc_is_in_the_matrix() -> None:
    methods = admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name
    assert set(methods) == {case.method for case in CASES}


async def _call(setup: Setup, case: Case, token: str | None) -> tuple[grpc.StatusCode, Any]:
    metadata = Admin.auth(token) if token is not None else ()
    try:
        answer = await getattr(setup.admin.stub, case.method)(case.request(setup),
                                                              metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return OK, answer


async def _acme_fingerprint(conn: AsyncConnection[Any]) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT (SELECT array_agg(state::text ORDER BY job_id) FROM jobs),"
        " (SELECT count(*) FROM job_statuses), (SELECT count(*) FROM write_keys"
        "  WHERE expires_at IS NOT NULL),"
        " (SELECT array_agg(concurrency ORDER BY id) FROM destinations),"
        " (SELECT array_agg((enabled, rate_per_second) ORDER BY id) FROM sources),"
        " (SELECT count(*) FROM tenants),"
        " (SELECT count(*) FROM admin_tokens), (SELECT count(revoked_at) FROM admin_tokens),"
        " (SELECT array_agg((enabled, event_filter)) FROM connections),"
        " (SELECT sum(filtered) FROM connection_counts),"
        " (SELECT array_agg((destination_key, secret, expires_at) ORDER BY secret_id)"
        "  FROM destination_secrets)")
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.method}-{i}" for i, c in enumerate(CASES)])
async def test_access_matrix(setup: Setup, world: World, case: Case) -> None:
    before = await _acme_fingerprint(world.conn)
    for token in (None, "rq_at_not-a-real-token", OPERATOR_TOKEN + "x"):
        code, _ = await _call(setup, case, token)
        assert code is UNAUTHENTICATED, (case.method, token)
    with pytest.raises(grpc.aio.AioRpcError) as basic:
        await getattr(setup.admin.stub, case.method)(
            case.request(setup), metadata=(("authorization", f"Basic {OPERATOR_TOKEN}"),))
    assert basic.value.code() is UNAUTHENTICATED

    code, answer = await _call(setup, case, setup.beta_token)
    assert code is case.other_tenant, (case.method, answer)
    if code is OK:
        shown = text_format.MessageToString(answer)
        assert "acme" not in shown, shown
        assert "alice" not in shown, shown
        if case.method in ("RetryJobs", "AbortJobs"):
            assert answer.matched == 0
    assert await _acme_fingerprint(world.conn) == before, "another tenant changed acme"

    code, answer = await _call(setup, case, setup.acme_token)
    assert code is case.own_tenant, (case.method, answer)
    if code is OK and case.method.startswith(("List", "Get", "Peek")):
        shown = text_format.MessageToString(answer)
        assert "beta" not in shown, shown

    code, answer = await _call(setup, case, OPERATOR_TOKEN)
    assert code is OK, (case.method, answer)


async def test_a_revoked_token_stops_at_once_and_stays_listed(setup: Setup) -> None:
    stub, own = setup.admin.stub, Admin.auth(setup.acme_token)
    await stub.ListSources(admin_pb2.ListSourcesRequest(), metadata=own)
    listed = await stub.ListAdminTokens(admin_pb2.ListAdminTokensRequest(), metadata=own)
    assert [(t.id, t.tenant_id, t.HasField("revoked_at")) for t in listed.tokens] == [
        (setup.acme_token_id, "acme", False)]

    revoked = await stub.RevokeAdminToken(
        admin_pb2.RevokeAdminTokenRequest(id=setup.acme_token_id), metadata=Admin.auth())
    assert revoked.HasField("revoked_at")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListSources(admin_pb2.ListSourcesRequest(), metadata=own)
    assert refused.value.code() is UNAUTHENTICATED
    assert refused.value.details() == "unknown or revoked admin token"
    # Beta's token is untouched.
    await stub.ListSources(admin_pb2.ListSourcesRequest(), metadata=Admin.auth(setup.beta_token))

    again = await stub.RevokeAdminToken(
        admin_pb2.RevokeAdminTokenRequest(id=setup.acme_token_id), metadata=Admin.auth())
    assert again.revoked_at == revoked.revoked_at
    everyone = await stub.ListAdminTokens(admin_pb2.ListAdminTokensRequest(),
                                          metadata=Admin.auth())
    assert [(t.tenant_id, t.revoked_at == revoked.revoked_at) for t in everyone.tokens] == [
        ("acme", True), ("beta", False)]

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.RevokeAdminToken(admin_pb2.RevokeAdminTokenRequest(id="tok-0000000000"),
                                    metadata=Admin.auth())
    assert unknown.value.code() is NOT_FOUND
    assert unknown.value.details() == "admin token 'tok-0000000000' not found"
