"""TLS on every gRPC port: RELAYQ_TLS_CERT_FILE and RELAYQ_TLS_KEY_FILE, a self-signed
certificate made by openssl for the test (tests.certs). A client that trusts it connects and
calls; a plaintext client, and a TLS client that does not trust it, are refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from relayq.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests.certs import needs_openssl, self_signed
from tests.cluster import service
from tests.services import OPERATOR_TOKEN

pytestmark = [pytest.mark.process, needs_openssl]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def health(channel: grpc.Channel) -> int:
    answer = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5)
    return int(answer.status)


def call_the_service(name: str, channel: grpc.Channel) -> None:
    """One real call of the service itself, not only health."""
    if name == "admin":
        admin_pb2_grpc.AdminStub(channel).ListTenants(
            admin_pb2.ListTenantsRequest(),
            metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),), timeout=5)
    elif name == "ingest":
        with pytest.raises(grpc.RpcError) as refused:
            ingest_pb2_grpc.IngestStub(channel).Ingest(
                ingest_pb2.IngestRequest(), metadata=(("authorization", "Bearer nope"),),
                timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("name", ["ingest", "router", "admin"])
def test_tls_client_connects_plaintext_is_refused(
        name: str, database: str, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    trusted = cert.read_bytes()
    with service(name, database, metrics=False, tls_root=trusted,
                 RELAYQ_TLS_CERT_FILE=str(cert), RELAYQ_TLS_KEY_FILE=str(key)) as svc:
        target = f"127.0.0.1:{svc.port}"
        credentials = grpc.ssl_channel_credentials(root_certificates=trusted)
        with grpc.secure_channel(target, credentials) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            call_the_service(name, channel)

        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as plain:
            health(channel)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE

        # TLS, but without trusting the self-signed certificate: the handshake fails.
        with grpc.secure_channel(target, grpc.ssl_channel_credentials()) as channel, \
                pytest.raises(grpc.RpcError) as untrusted:
            health(channel)
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
