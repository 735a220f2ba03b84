"""The router reaches destinations over TLS: https:// webhooks and grpcs:// gRPC sinks, whose
certificate a private CA (here: self-signed) signed, trusted through RELAYQ_DESTINATION_CA_FILE.
A gRPC sink gets the destination's headers as call metadata."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from psycopg.types.json import Jsonb

from relayq.config import ConfigError, Env
from router_service.config import RouterConfig
from tests import factories
from tests.certs import needs_openssl, self_signed
from tests.helpers import event
from tests.pipeline import World, send, wait_until_finished
from tests.poll import eventually
from tests.services import ingest, quiet_env, router
from tests.sinks import GrpcSink, WebhookSink

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("destination-tls"))


@pytest.fixture
async def grpcs_sink(certificate: tuple[Path, Path]) -> AsyncIterator[GrpcSink]:
    cert, key = certificate
    sink = GrpcSink()
    await sink.start(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    yield sink
    await sink.stop()


@pytest.fixture
async def https_sink(certificate: tuple[Path, Path]) -> AsyncIterator[WebhookSink]:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = WebhookSink()
    await sink.start(context)
    yield sink
    await sink.stop()


async def test_a_grpcs_sink_gets_events_over_tls_with_headers_as_metadata(
        world: World, grpcs_sink: GrpcSink, certificate: tuple[Path, Path]) -> None:
    assert grpcs_sink.endpoint.startswith("grpcs://")
    key = await factories.destination(
        world.conn, world.tenant, "secure", kind="grpc", endpoint=grpcs_sink.endpoint,
        headers=Jsonb({"authorization": "Bearer sink-secret"}))
    await factories.connect(world.conn, world.source.key, key)
    async with ingest(world.database) as service, \
            router(world.database, RELAYQ_DESTINATION_CA_FILE=str(certificate[0])):
        ids = await send(service, world.source, [event(f"m{i}", "alice") for i in range(3)])
        await wait_until_finished(world.conn, 3)
    assert [r.job_id for r in grpcs_sink.oks] == ids
    assert {r.headers.get("authorization") for r in grpcs_sink.oks} == {"Bearer sink-secret"}


async def test_an_https_webhook_signed_by_a_private_ca_is_trusted_through_the_ca_file(
        world: World, https_sink: WebhookSink, certificate: tuple[Path, Path]) -> None:
    key = await factories.destination(world.conn, world.tenant, "secure-hook",
                                      endpoint=https_sink.url)
    await factories.connect(world.conn, world.source.key, key)
    async with ingest(world.database) as service, \
            router(world.database, RELAYQ_DESTINATION_CA_FILE=str(certificate[0])):
        ids = await send(service, world.source, [event("m1", "alice")])
        await wait_until_finished(world.conn, 1)
    assert [r.job_id for r in https_sink.oks] == ids


async def test_grpcs_trusts_the_authorities_https_does(
        world: World, grpcs_sink: GrpcSink, certificate: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An authority in the system's store (here SSL_CERT_FILE) is trusted by grpcs:// as by
    https://, though gRPC reads no system store of its own."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    key = await factories.destination(world.conn, world.tenant, "secure", kind="grpc",
                                      endpoint=grpcs_sink.endpoint)
    await factories.connect(world.conn, world.source.key, key)
    async with ingest(world.database) as service, router(world.database):
        ids = await send(service, world.source, [event("m1", "alice")])
        await wait_until_finished(world.conn, 1)
    assert [r.job_id for r in grpcs_sink.oks] == ids


@pytest.mark.parametrize("kind", ["grpc", "webhook"])
async def test_without_the_ca_the_certificate_is_refused_and_the_job_retries(
        world: World, grpcs_sink: GrpcSink, https_sink: WebhookSink, kind: str) -> None:
    endpoint = grpcs_sink.endpoint if kind == "grpc" else https_sink.url
    key = await factories.destination(world.conn, world.tenant, "untrusted", kind=kind,
                                      endpoint=endpoint, max_attempts=100)
    await factories.connect(world.conn, world.source.key, key)
    async with ingest(world.database) as service, router(world.database):
        (job_id,) = await send(service, world.source, [event("m1", "alice")])
        await _wait_for_attempt(world, job_id)
    cur = await world.conn.execute(
        "SELECT j.state::text, s.state::text, s.error_code FROM jobs j"
        " JOIN job_statuses s USING (job_id) WHERE job_id = %s ORDER BY s.attempt LIMIT 1",
        (job_id,))
    state, attempt_state, error_code = await cur.fetchone() or (None, None, None)
    assert (state, attempt_state) == ("failed", "failed")
    assert error_code == "tls"
    assert not grpcs_sink.received
    assert not https_sink.received


async def test_a_grpc_row_written_before_the_rules_delivers_with_the_headers_grpc_can_carry(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Before gRPC destinations sent headers, the admin stored any; such a row keeps
    delivering, with what gRPC can carry (names lowered) and a warning for the rest."""
    key = await factories.destination(
        world.conn, world.tenant, "old", kind="grpc", endpoint=world.grpc_sink.endpoint,
        headers=Jsonb({"Authorization": "Bearer k", "grpc-timeout": "1S", "X-Api+Key": "x"}))
    await factories.connect(world.conn, world.source.key, key)
    async with ingest(world.database) as service, router(world.database):
        await send(service, world.source, [event("m1", "alice")])
        await wait_until_finished(world.conn, 1)
    (delivery,) = world.grpc_sink.oks
    assert delivery.headers["authorization"] == "Bearer k"
    assert "grpc-timeout" not in delivery.headers
    assert "x-api+key" not in delivery.headers
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "'grpc-timeout' is reserved by gRPC" in warned
    assert "'X-Api+Key': gRPC metadata names are" in warned


async def test_a_grpc_endpoint_the_admin_would_refuse_fails_deliveries_with_the_reason(
        world: World) -> None:
    """Written by hand past the admin service: the lane keeps running, and each attempt
    says what to fix."""
    key = await factories.destination(world.conn, world.tenant, "odd", kind="grpc",
                                      endpoint="sink.local", max_attempts=100)
    await factories.connect(world.conn, world.source.key, key)
    async with ingest(world.database) as service, router(world.database):
        (job_id,) = await send(service, world.source, [event("m1", "alice")])
        await _wait_for_attempt(world, job_id)
    cur = await world.conn.execute(
        "SELECT error_code, response FROM job_statuses WHERE job_id = %s", (job_id,))
    error_code, response = (await cur.fetchall())[0]
    assert error_code == "config"
    assert "a grpc endpoint is host:port" in response
    assert not world.grpc_sink.received


def test_a_missing_ca_file_stops_the_router_at_start(database: str) -> None:
    with pytest.raises(ConfigError, match="RELAYQ_DESTINATION_CA_FILE"):
        RouterConfig.from_env(Env(quiet_env(database,
                                            RELAYQ_DESTINATION_CA_FILE="/nonexistent.pem")))


async def _wait_for_attempt(world: World, job_id: int) -> None:
    async def attempted() -> bool:
        cur = await world.conn.execute(
            "SELECT count(*) FROM job_statuses WHERE job_id = %s", (job_id,))
        return bool((await cur.fetchone() or [0])[0])

    await eventually(attempted, what=f"an attempt of job {job_id}")
