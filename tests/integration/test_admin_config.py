"""relayq-admin configuration RPCs against a real Postgres, ingest and router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from psycopg import AsyncConnection

from relayq.v1 import admin_pb2, common_pb2, ingest_pb2, ingest_pb2_grpc
from tests.helpers import event
from tests.pipeline import router_sees
from tests.services import Admin, admin, ingest, router
from tests.sinks import WebhookSink

AUTH = Admin.auth()


@pytest.fixture
async def service(database: str) -> AsyncIterator[Admin]:
    async with admin(database) as running:
        yield running


async def _tenant_source(service: Admin, tenant: str = "acme") -> admin_pb2.SourceWithKey:
    await service.stub.CreateTenant(admin_pb2.CreateTenantRequest(id=tenant, name="Acme"),
                                    metadata=AUTH)
    return await service.stub.CreateSource(
        admin_pb2.CreateSourceRequest(id=f"{tenant}-web", tenant_id=tenant, name="Web"),
        metadata=AUTH)


async def _ingest(port: int, write_key: str, events: list[ingest_pb2.Event]
                  ) -> ingest_pb2.IngestResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        response: ingest_pb2.IngestResponse = await stub.Ingest(
            ingest_pb2.IngestRequest(events=events),
            metadata=(("authorization", f"Bearer {write_key}"),))
        return response


async def test_configuration_made_through_admin_carries_events_to_a_webhook(
        database: str, service: Admin) -> None:
    created = await _tenant_source(service)
    assert created.write_key.startswith("rq_wk_")
    assert created.source.tenant_id == "acme"
    sink = WebhookSink()
    await sink.start()
    try:
        destination = await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id="hook", tenant_id="acme", type="webhook", endpoint=sink.url,
            retry_policy=common_pb2.RetryPolicy(min_backoff_ms=20, max_backoff_ms=100),
            headers={"X-Api-Key": "k1"}), metadata=AUTH)
        assert destination.concurrency == 64
        assert destination.timeout_ms == 30_000
        assert destination.retry_policy.max_attempts == 10
        connection = await service.stub.ConnectSource(
            admin_pb2.ConnectSourceRequest(source_id="acme-web", destination_id="hook"),
            metadata=AUTH)
        assert connection.enabled
        async with ingest(database) as ingest_service, router(database):
            answer = await _ingest(ingest_service.app.port, created.write_key,
                                   [event("m1", "alice"), event("m2", "alice")])
            assert answer.accepted == 2
            await sink.wait_for(lambda: len(sink.oks) == 2)
            assert sink.oks[0].headers.get("X-Api-Key") == "k1"
    finally:
        await sink.stop()


async def test_a_source_disabled_or_limited_through_admin_is_refused_by_a_running_ingest(
        database: str, service: Admin) -> None:
    created = await _tenant_source(service)
    assert created.source.enabled
    assert created.source.rate_limit.per_second == 0

    async def answers(number: int) -> grpc.StatusCode:
        try:
            await _ingest(ingest_service.app.port, created.write_key, [event(f"m{number}", "al")])
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async def becomes(code: grpc.StatusCode) -> None:
        for number in range(50):  # the config NOTIFY clears ingest's cache within moments
            if await answers(number) is code:
                return
            await asyncio.sleep(0.1)
        pytest.fail(f"ingest never answered {code.name}")

    # Routes cached for an hour: only the config NOTIFY can carry the changes in time.
    async with ingest(database, RELAYQ_INGEST_ROUTE_CACHE_SECONDS="3600") as ingest_service:
        assert await answers(0) is grpc.StatusCode.OK
        disabled = await service.stub.UpdateSource(
            admin_pb2.UpdateSourceRequest(id="acme-web", enabled=False), metadata=AUTH)
        assert not disabled.enabled
        assert disabled.name == "Web"  # only what was asked changed
        await becomes(grpc.StatusCode.PERMISSION_DENIED)

        limited = await service.stub.UpdateSource(admin_pb2.UpdateSourceRequest(
            id="acme-web", enabled=True, name="Website",
            rate_limit=common_pb2.RateLimit(per_second=0.01, burst=1)), metadata=AUTH)
        assert (limited.enabled, limited.name, limited.rate_limit.per_second,
                limited.rate_limit.burst) == (True, "Website", 0.01, 1)
        await becomes(grpc.StatusCode.RESOURCE_EXHAUSTED)

        await service.stub.UpdateSource(admin_pb2.UpdateSourceRequest(
            id="acme-web", rate_limit=common_pb2.RateLimit()), metadata=AUTH)
        await becomes(grpc.StatusCode.OK)
        got = await service.stub.GetSource(admin_pb2.GetSourceRequest(id="acme-web"),
                                           metadata=AUTH)
        assert (got.enabled, got.name, got.rate_limit.per_second) == (True, "Website", 0)


async def test_a_paused_destination_holds_jobs_until_resumed_in_order(
        database: str, service: Admin) -> None:
    created = await _tenant_source(service)
    sink, control = WebhookSink(), WebhookSink()
    await sink.start()
    await control.start()
    try:
        for destination_id, receiver in (("hook", sink), ("control", control)):
            await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
                id=destination_id, tenant_id="acme", type="webhook", endpoint=receiver.url),
                metadata=AUTH)
            await service.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
                source_id="acme-web", destination_id=destination_id), metadata=AUTH)
        async with ingest(database) as ingest_service, router(database) as running:
            paused = await service.stub.UpdateDestination(
                admin_pb2.UpdateDestinationRequest(id="hook", paused=True), metadata=AUTH)
            assert paused.paused
            await router_sees(running, "hook", paused=True)
            await _ingest(ingest_service.app.port, created.write_key,
                          [event(f"m{i}", "bob") for i in range(5)])
            # The same events reached the unpaused destination: the router has them in hand.
            await control.wait_for(lambda: len(control.oks) == 5)
            assert sink.oks == []
            await service.stub.UpdateDestination(
                admin_pb2.UpdateDestinationRequest(id="hook", paused=False), metadata=AUTH)
            await sink.wait_for(lambda: len(sink.oks) == 5)
        assert [r.message_id for r in sink.oks] == [f"m{i}" for i in range(5)]
    finally:
        await sink.stop()
        await control.stop()


async def test_rotating_a_write_key_retires_the_old_one(database: str, service: Admin) -> None:
    created = await _tenant_source(service)
    rotated = await service.stub.RotateWriteKey(
        admin_pb2.RotateWriteKeyRequest(source_id="acme-web", grace_seconds=0), metadata=AUTH)
    assert rotated.write_key != created.write_key
    async with ingest(database) as ingest_service:
        with pytest.raises(grpc.aio.AioRpcError) as old:
            await _ingest(ingest_service.app.port, created.write_key, [event("m1", "a")])
        assert old.value.code() is grpc.StatusCode.UNAUTHENTICATED
        answer = await _ingest(ingest_service.app.port, rotated.write_key, [event("m1", "a")])
        assert answer.accepted == 1


async def test_rotation_with_grace_keeps_the_old_key_working_for_now(
        database: str, service: Admin) -> None:
    created = await _tenant_source(service)
    await service.stub.RotateWriteKey(
        admin_pb2.RotateWriteKeyRequest(source_id="acme-web", grace_seconds=3600),
        metadata=AUTH)
    async with ingest(database) as ingest_service:
        answer = await _ingest(ingest_service.app.port, created.write_key, [event("m1", "a")])
        assert answer.accepted == 1


async def test_get_and_list_every_kind_of_object(service: Admin) -> None:
    await _tenant_source(service)
    await _tenant_source(service, "beta")
    for i in range(3):
        await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
            id=f"d{i}", tenant_id="acme", type="grpc", endpoint=f"127.0.0.1:{7000 + i}"),
            metadata=AUTH)
    await service.stub.ConnectSource(
        admin_pb2.ConnectSourceRequest(source_id="acme-web", destination_id="d1"), metadata=AUTH)

    tenant = await service.stub.GetTenant(admin_pb2.GetTenantRequest(id="acme"), metadata=AUTH)
    assert tenant.name == "Acme"
    tenants = await service.stub.ListTenants(admin_pb2.ListTenantsRequest(), metadata=AUTH)
    assert [t.id for t in tenants.tenants] == ["acme", "beta"]
    source = await service.stub.GetSource(admin_pb2.GetSourceRequest(id="beta-web"),
                                          metadata=AUTH)
    assert source.tenant_id == "beta"
    sources = await service.stub.ListSources(admin_pb2.ListSourcesRequest(tenant_id="beta"),
                                             metadata=AUTH)
    assert [s.id for s in sources.sources] == ["beta-web"]

    # Keyset pages: two, then one, then none.
    first = await service.stub.ListDestinations(
        admin_pb2.ListDestinationsRequest(page_size=2), metadata=AUTH)
    assert [d.id for d in first.destinations] == ["d0", "d1"]
    second = await service.stub.ListDestinations(
        admin_pb2.ListDestinationsRequest(page_size=2, page_token=first.next_page_token),
        metadata=AUTH)
    assert [d.id for d in second.destinations] == ["d2"]
    assert second.next_page_token == ""

    got = await service.stub.GetDestination(admin_pb2.GetDestinationRequest(id="d2"),
                                            metadata=AUTH)
    assert got.endpoint == "127.0.0.1:7002"
    connections = await service.stub.ListConnections(
        admin_pb2.ListConnectionsRequest(source_id="acme-web"), metadata=AUTH)
    assert [(c.source_id, c.destination_id, c.enabled) for c in connections.connections] == [
        ("acme-web", "d1", True)]
    off = await service.stub.DisconnectSource(
        admin_pb2.DisconnectSourceRequest(source_id="acme-web", destination_id="d1"),
        metadata=AUTH)
    assert not off.enabled


async def test_update_changes_only_what_is_set(service: Admin) -> None:
    await _tenant_source(service)
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="hook", tenant_id="acme", type="webhook", endpoint="https://example.com/a",
        concurrency=8, headers={"A": "1"}), metadata=AUTH)
    updated = await service.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
        id="hook", timeout_ms=5000, headers={"B": "2"},
        rate_limit=common_pb2.RateLimit(per_second=10, burst=20)), metadata=AUTH)
    assert updated.concurrency == 8
    assert updated.timeout_ms == 5000
    assert dict(updated.headers) == {"A": "1", "B": "2"}
    assert updated.rate_limit.per_second == 10
    replaced = await service.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
        id="hook", headers={"C": "3"}, replace_headers=True), metadata=AUTH)
    assert dict(replaced.headers) == {"C": "3"}
    assert replaced.updated_at.ToDatetime() >= updated.updated_at.ToDatetime()


async def test_grpc_destinations_take_tls_endpoints_and_store_metadata_names_lowered(
        service: Admin, conn: AsyncConnection[Any]) -> None:
    await _tenant_source(service)
    created = await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="sink", tenant_id="acme", type="grpc", endpoint="grpcs://sink.example.com:443",
        headers={"Authorization": "Bearer k"}), metadata=AUTH)
    assert created.endpoint == "grpcs://sink.example.com:443"
    assert dict(created.headers) == {"authorization": "Bearer k"}
    updated = await service.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
        id="sink", endpoint="grpc://sink-2.example.com:7000",
        headers={"AUTHORIZATION": "Bearer k2"}),
        metadata=AUTH)
    assert updated.endpoint == "grpc://sink-2.example.com:7000"
    assert dict(updated.headers) == {"authorization": "Bearer k2"}
    # A row stored before names were lowered merges with a change by the lowered name.
    await conn.execute("""UPDATE destinations SET headers = '{"X-Tenant": "a"}', """
                       "sealed_headers = NULL WHERE id = 'sink'")
    merged = await service.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
        id="sink", headers={"x-tenant": "b", "x-region": "eu"}), metadata=AUTH)
    assert dict(merged.headers) == {"x-tenant": "b", "x-region": "eu"}


async def _counts(conn: AsyncConnection[Any]) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM sources),"
        " (SELECT count(*) FROM destinations), (SELECT count(*) FROM connections),"
        " (SELECT count(*) FROM write_keys), (SELECT count(*) FROM admin_tokens),"
        " (SELECT count(revoked_at) FROM admin_tokens),"
        " (SELECT array_agg((name, enabled, rate_per_second, rate_burst) ORDER BY id)::text"
        "  FROM sources),"
        " (SELECT array_agg(d ORDER BY d.destination_key)::text FROM destinations d),"
        " (SELECT array_agg(w ORDER BY w.key_hash)::text FROM write_keys w),"
        " (SELECT array_agg(s ORDER BY s.secret_id)::text FROM destination_secrets s)")
    row = await cur.fetchone()
    assert row is not None
    return tuple(row)


BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    ("CreateTenant", "bad tenant id", admin_pb2.CreateTenantRequest(id="Acme!"), "id"),
    ("CreateTenant", "empty tenant id", admin_pb2.CreateTenantRequest(id=""), "id"),
    ("CreateTenant", "long name", admin_pb2.CreateTenantRequest(id="x", name="n" * 201), "name"),
    ("CreateSource", "no tenant", admin_pb2.CreateSourceRequest(id="s"), "tenant_id"),
    ("CreateSource", "bad id", admin_pb2.CreateSourceRequest(id="-s", tenant_id="acme"), "id"),
    ("CreateDestination", "bad type", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="smtp", endpoint="x"), "type"),
    ("CreateDestination", "ftp url", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="ftp://example.com"), "endpoint"),
    ("CreateDestination", "no host", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://"), "endpoint"),
    ("CreateDestination", "bad port", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h:99999/x"), "endpoint"),
    ("CreateDestination", "grpc without port", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="sink.local"), "endpoint"),
    ("CreateDestination", "empty endpoint", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc"), "endpoint"),
    ("CreateDestination", "backoff upside down", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", retry_policy=common_pb2.RetryPolicy(
            min_backoff_ms=5000, max_backoff_ms=10)), "retry_policy.max_backoff_ms"),
    ("CreateDestination", "negative rate", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        rate_limit=common_pb2.RateLimit(per_second=-1)), "rate_limit.per_second"),
    ("CreateDestination", "nan rate", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        rate_limit=common_pb2.RateLimit(per_second=float("nan"))), "rate_limit.per_second"),
    ("CreateDestination", "huge concurrency", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", concurrency=10_001), "concurrency"),
    ("CreateDestination", "huge timeout", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", timeout_ms=600_001), "timeout_ms"),
    ("CreateDestination", "header injection", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/", headers={"A": "x\r\nB: y"}),
     "headers"),
    ("CreateDestination", "bad header name", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/", headers={"A B": "x"}),
     "headers"),
    ("CreateDestination", "grpc with an http scheme", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="https://sink.local:443"), "endpoint"),
    ("CreateDestination", "grpcs without port", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="grpcs://sink.local"), "endpoint"),
    ("CreateDestination", "grpc header gRPC keeps", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", headers={"grpc-timeout": "1S"}),
     "headers"),
    ("CreateDestination", "a webhook signature header", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/",
        headers={"Webhook-Signature": "v1,forged"}), "headers"),
    ("UpdateDestination", "a webhook content-type header", admin_pb2.UpdateDestinationRequest(
        id="hook", headers={"content-type": "text/plain"}), "headers"),
    ("CreateDestination", "grpc content-type header", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", headers={"Content-Type": "x"}),
     "headers"),
    ("CreateDestination", "grpc binary header", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", headers={"key-bin": "x"}), "headers"),
    ("CreateDestination", "grpc headers equal lower-cased",
     admin_pb2.CreateDestinationRequest(tenant_id="acme", type="grpc", endpoint="h:1",
                                        headers={"X-Key": "a", "x-key": "b"}), "headers"),
    ("CreateDestination", "grpc header name gRPC refuses", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", headers={"X-Api+Key": "x"}), "headers"),
    ("CreateDestination", "grpc header not ascii", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1", headers={"x-name": "café"}),
     "headers"),
    ("CreateDestination", "unclosed IPv6 bracket", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://[::1/"), "endpoint"),
    ("CreateDestination", "NUL in the endpoint", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/\x00"), "endpoint"),
    ("CreateDestination", "NUL in a header value", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/", headers={"A": "x\x00"}),
     "headers"),
    ("CreateDestination", "min backoff over a day", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        retry_policy=common_pb2.RetryPolicy(min_backoff_ms=100_000_000)),
     "retry_policy.min_backoff_ms"),
    ("CreateDestination", "max backoff over a day", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        retry_policy=common_pb2.RetryPolicy(max_backoff_ms=86_400_001)),
     "retry_policy.max_backoff_ms"),
    ("CreateDestination", "too many attempts", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        retry_policy=common_pb2.RetryPolicy(max_attempts=1001)), "retry_policy.max_attempts"),
    ("CreateDestination", "retry window over 30 days", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        retry_policy=common_pb2.RetryPolicy(max_retry_window_seconds=30 * 86400 + 1)),
     "retry_policy.max_retry_window_seconds"),
    ("CreateDestination", "rate over a million", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        rate_limit=common_pb2.RateLimit(per_second=1_000_001)), "rate_limit.per_second"),
    ("CreateDestination", "burst over a million", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="grpc", endpoint="h:1",
        rate_limit=common_pb2.RateLimit(per_second=1, burst=1_000_001)), "rate_limit.burst"),
    ("UpdateDestination", "endpoint of wrong kind", admin_pb2.UpdateDestinationRequest(
        id="hook", endpoint="not a url"), "endpoint"),
    ("UpdateDestination", "no id", admin_pb2.UpdateDestinationRequest(concurrency=2), "id"),
    ("UpdateDestination", "huge concurrency", admin_pb2.UpdateDestinationRequest(
        id="hook", concurrency=10_001), "concurrency"),
    ("UpdateDestination", "huge timeout", admin_pb2.UpdateDestinationRequest(
        id="hook", timeout_ms=600_001), "timeout_ms"),
    ("UpdateDestination", "backoff upside down", admin_pb2.UpdateDestinationRequest(
        id="hook", retry_policy=common_pb2.RetryPolicy(min_backoff_ms=5000, max_backoff_ms=10)),
     "retry_policy.max_backoff_ms"),
    ("UpdateDestination", "negative rate", admin_pb2.UpdateDestinationRequest(
        id="hook", rate_limit=common_pb2.RateLimit(per_second=-1)), "rate_limit.per_second"),
    ("UpdateDestination", "header injection", admin_pb2.UpdateDestinationRequest(
        id="hook", headers={"A": "x\nB: y"}), "headers"),
    ("GetTenant", "no id", admin_pb2.GetTenantRequest(), "id"),
    ("GetSource", "NUL in the id", admin_pb2.GetSourceRequest(id="acme\x00web"), "id"),
    ("GetDestination", "no id", admin_pb2.GetDestinationRequest(), "id"),
    ("PeekJobs", "no destination", admin_pb2.PeekJobsRequest(), "destination_id"),
    ("ConnectSource", "no source", admin_pb2.ConnectSourceRequest(destination_id="hook"),
     "source_id"),
    ("DisconnectSource", "no destination", admin_pb2.DisconnectSourceRequest(
        source_id="acme-web"), "destination_id"),
    ("ListConnections", "malformed source id", admin_pb2.ListConnectionsRequest(
        source_id="Web!"), "source_id"),
    ("ListSources", "a page token hiding a NUL", admin_pb2.ListSourcesRequest(
        page_token="c291cmNlczoA"), "page_token"),
    ("RotateWriteKey", "no source", admin_pb2.RotateWriteKeyRequest(), "source_id"),
    ("RotateSigningSecret", "no destination", admin_pb2.RotateSigningSecretRequest(),
     "destination_id"),
    ("RotateSigningSecret", "grace too long", admin_pb2.RotateSigningSecretRequest(
        destination_id="hook", grace_seconds=30 * 86400 + 1), "grace_seconds"),
    ("CreateAdminToken", "no tenant", admin_pb2.CreateAdminTokenRequest(name="ci"),
     "tenant_id"),
    ("CreateAdminToken", "long name", admin_pb2.CreateAdminTokenRequest(
        tenant_id="acme", name="n" * 201), "name"),
    ("RetryJobs", "NUL in the reason", admin_pb2.RetryJobsRequest(
        selector=admin_pb2.JobSelector(job_ids=[1]), reason="oops\x00"), "reason"),
    ("ListDestinations", "page too big", admin_pb2.ListDestinationsRequest(page_size=1001),
     "page_size"),
    ("ListSources", "forged page token", admin_pb2.ListSourcesRequest(page_token="zz!"),
     "page_token"),
    ("RotateWriteKey", "grace too long", admin_pb2.RotateWriteKeyRequest(
        source_id="acme-web", grace_seconds=40 * 86400), "grace_seconds"),
    ("CreateSource", "negative rate", admin_pb2.CreateSourceRequest(
        tenant_id="acme", rate_limit=common_pb2.RateLimit(per_second=-1)),
     "rate_limit.per_second"),
    ("UpdateSource", "infinite rate beside a valid change", admin_pb2.UpdateSourceRequest(
        id="acme-web", name="Renamed", enabled=False,
        rate_limit=common_pb2.RateLimit(per_second=float("inf"))), "rate_limit.per_second"),
    ("UpdateSource", "no id", admin_pb2.UpdateSourceRequest(name="x"), "id"),
    ("UpdateSource", "NUL in the name", admin_pb2.UpdateSourceRequest(id="acme-web",
                                                                      name="a\x00b"), "name"),
    ("UpdateSource", "long name", admin_pb2.UpdateSourceRequest(id="acme-web", name="x" * 300),
     "name"),
    ("RevokeAdminToken", "no id", admin_pb2.RevokeAdminTokenRequest(), "id"),
    ("RevokeAdminToken", "a secret, not an id", admin_pb2.RevokeAdminTokenRequest(
        id="rq_at_AbC"), "id"),
    ("ConnectSource", "across tenants", admin_pb2.ConnectSourceRequest(
        source_id="acme-web", destination_id="beta-hook"), "destination_id"),
    ("CreateDestination", "a grpc destination with a batch policy",
     admin_pb2.CreateDestinationRequest(tenant_id="acme", type="grpc", endpoint="h:1",
                                        batch_policy=admin_pb2.BatchPolicy(max_events=10)),
     "batch_policy"),
    ("CreateDestination", "batches of too many events", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/",
        batch_policy=admin_pb2.BatchPolicy(max_events=10_001)), "batch_policy.max_events"),
    ("CreateDestination", "batches of too few bytes", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/",
        batch_policy=admin_pb2.BatchPolicy(max_events=10, max_bytes=100)),
     "batch_policy.max_bytes"),
    ("UpdateDestination", "a linger over a minute", admin_pb2.UpdateDestinationRequest(
        id="hook", batch_policy=admin_pb2.BatchPolicy(max_events=10, linger_ms=60_001)),
     "batch_policy.linger_ms"),
    ("CreateDestination", "a circuit probe over a day", admin_pb2.CreateDestinationRequest(
        tenant_id="acme", type="webhook", endpoint="http://h/",
        circuit_policy=admin_pb2.CircuitPolicy(probe_every_seconds=86_401)),
     "circuit_policy.probe_every_seconds"),
]


@pytest.mark.parametrize(("method", "case", "request_message", "field"), BAD_REQUESTS,
                         ids=[case for _, case, _, _ in BAD_REQUESTS])
async def test_bad_configuration_requests_name_the_field_and_change_nothing(
        service: Admin, conn: AsyncConnection[Any], method: str, case: str,
        request_message: Any, field: str) -> None:
    await _tenant_source(service)
    await _tenant_source(service, "beta")
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="hook", tenant_id="acme", type="webhook", endpoint="http://h/"), metadata=AUTH)
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="beta-hook", tenant_id="beta", type="webhook", endpoint="http://h/"), metadata=AUTH)
    before = await _counts(conn)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await getattr(service.stub, method)(request_message, metadata=AUTH)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT, case
    assert (failure.value.details() or "").startswith(f"{field}:"), failure.value.details()
    assert await _counts(conn) == before


async def test_duplicates_and_missing_references(service: Admin) -> None:
    await _tenant_source(service)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await service.stub.CreateTenant(admin_pb2.CreateTenantRequest(id="acme"), metadata=AUTH)
    assert again.value.code() is grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await service.stub.CreateSource(
            admin_pb2.CreateSourceRequest(tenant_id="nobody"), metadata=AUTH)
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await service.stub.GetDestination(admin_pb2.GetDestinationRequest(id="nope"),
                                          metadata=AUTH)
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND


UNKNOWN_REFERENCES: list[tuple[str, Any, str]] = [
    ("CreateDestination", admin_pb2.CreateDestinationRequest(
        tenant_id="nobody", type="grpc", endpoint="h:1"), "tenant 'nobody' not found"),
    ("CreateAdminToken", admin_pb2.CreateAdminTokenRequest(tenant_id="nobody"),
     "tenant 'nobody' not found"),
    ("ConnectSource", admin_pb2.ConnectSourceRequest(source_id="nope", destination_id="hook"),
     "source 'nope' not found"),
    ("ConnectSource", admin_pb2.ConnectSourceRequest(source_id="acme-web",
                                                     destination_id="nope"),
     "destination 'nope' not found"),
    ("RotateWriteKey", admin_pb2.RotateWriteKeyRequest(source_id="nope"),
     "source 'nope' not found"),
    ("RotateSigningSecret", admin_pb2.RotateSigningSecretRequest(destination_id="nope"),
     "destination 'nope' not found"),
    ("UpdateSource", admin_pb2.UpdateSourceRequest(id="nope", name="x"),
     "source 'nope' not found"),
    ("UpdateDestination", admin_pb2.UpdateDestinationRequest(id="nope", concurrency=1),
     "destination 'nope' not found"),
    ("RevokeAdminToken", admin_pb2.RevokeAdminTokenRequest(id="tok-nope"), "not found"),
    ("ListSources", admin_pb2.ListSourcesRequest(tenant_id="nobody"),
     "tenant 'nobody' not found"),
    ("ListDestinations", admin_pb2.ListDestinationsRequest(tenant_id="nobody"),
     "tenant 'nobody' not found"),
    ("ListConnections", admin_pb2.ListConnectionsRequest(destination_id="nope"),
     "destination 'nope' not found"),
    ("ListAdminTokens", admin_pb2.ListAdminTokensRequest(tenant_id="nobody"),
     "tenant 'nobody' not found"),
    ("GetStats", admin_pb2.GetStatsRequest(tenant_id="nobody"), "tenant 'nobody' not found"),
    ("PeekJobs", admin_pb2.PeekJobsRequest(destination_id="nope"),
     "destination 'nope' not found"),
]


@pytest.mark.parametrize(("method", "request_message", "message"), UNKNOWN_REFERENCES,
                         ids=[f"{m}: {text}" for m, _, text in UNKNOWN_REFERENCES])
async def test_a_reference_to_nothing_is_not_found_and_changes_nothing(
        service: Admin, conn: AsyncConnection[Any], method: str, request_message: Any,
        message: str) -> None:
    await _tenant_source(service)
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="hook", tenant_id="acme", type="webhook", endpoint="http://h/"), metadata=AUTH)
    before = await _counts(conn)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await getattr(service.stub, method)(request_message, metadata=AUTH)
    assert failure.value.code() is grpc.StatusCode.NOT_FOUND
    assert message in (failure.value.details() or ""), failure.value.details()
    assert await _counts(conn) == before


async def test_a_webhook_takes_a_batch_policy_and_shows_it(service: Admin) -> None:
    await _tenant_source(service)
    made = await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="bulk", tenant_id="acme", type="webhook", endpoint="http://h/",
        batch_policy=admin_pb2.BatchPolicy(max_events=100, linger_ms=250)), metadata=AUTH)
    assert made.batch_policy == admin_pb2.BatchPolicy(max_events=100, max_bytes=1_048_576,
                                                      linger_ms=250)
    changed = await service.stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
        id="bulk", batch_policy=admin_pb2.BatchPolicy(max_events=1)), metadata=AUTH)
    assert changed.batch_policy.max_events == 1  # back to one event a request
    plain = await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="plain", tenant_id="acme", type="grpc", endpoint="h:1"), metadata=AUTH)
    assert plain.batch_policy.max_events == 1
