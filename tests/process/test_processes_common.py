"""What every relayq process shares: health, reflection, configuration errors, `relayq migrate`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.databases import SERVER_DSN, dsn_for
from tests.helpers import TEST_SECRET_KEY
from tests.services import ingest


async def test_ingest_serves_health_and_reflection(database: str) -> None:
    async with ingest(database) as service:
        health = health_pb2_grpc.HealthStub(service.channel)
        for name in ("", "relayq.v1.Ingest"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

        stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="relayq.v1.Ingest"),
        ]
        answers = [a async for a in stub.ServerReflectionInfo(iter(requests), timeout=5)]
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {"relayq.v1.Ingest", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= listed
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in answers[1].file_descriptor_response.file_descriptor_proto]
    ingest_file = next(f for f in files if f.name == "relayq/v1/ingest.proto")
    assert [m.name for m in ingest_file.service[0].method] == ["Ingest"]


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYQ_", "PG"))}
    return subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({}, "RELAYQ_DATABASE_URL", id="no database"),
        pytest.param({"RELAYQ_INGEST_ADDRESS": "nowhere"}, "RELAYQ_INGEST_ADDRESS", id="address"),
        pytest.param({"RELAYQ_INGEST_MAX_BATCH_EVENTS": "lots"}, "RELAYQ_INGEST_MAX_BATCH_EVENTS",
                     id="not a number"),
        pytest.param({"RELAYQ_INGEST_FLUSH_CONCURRENCY": "0"}, "RELAYQ_INGEST_FLUSH_CONCURRENCY",
                     id="out of range"),
        pytest.param({"RELAYQ_TLS_CERT_FILE": "/nonexistent.pem"}, "RELAYQ_TLS_CERT_FILE",
                     id="missing certificate"),
        pytest.param({"RELAYQ_MIGRATE": "perhaps"}, "RELAYQ_MIGRATE", id="not a boolean"),
        pytest.param({"RELAYQ_LOG_LEVEL": "loud"}, "RELAYQ_LOG_LEVEL", id="log level"),
        pytest.param({"RELAYQ_INGEST_WORKERS": "0"}, "RELAYQ_INGEST_WORKERS", id="workers"),
    ],
)
def test_bad_configuration_stops_ingest_at_start_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    base = {"RELAYQ_DATABASE_URL": "postgresql://127.0.0.1:9/none"} if variable != \
        "RELAYQ_DATABASE_URL" else {}
    result = _run([sys.executable, "-c", "import ingest_service.main as m; m.main()"],
                  {**base, **env})
    assert result.returncode == 2
    assert f"bad configuration: {variable}:" in result.stderr


def test_relayq_migrate_applies_the_schema_once(empty_database: str) -> None:
    argv = [sys.executable, "-c", "import relayq.cli as c; c.main()", "migrate"]
    first = _run(argv, {"RELAYQ_DATABASE_URL": empty_database})
    again = _run(argv, {"RELAYQ_DATABASE_URL": empty_database})
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert "schema is current" in again.stdout


def test_relayq_migrate_reports_an_unreachable_database() -> None:
    argv = [sys.executable, "-c", "import relayq.cli as c; c.main()", "migrate", "--wait", "1"]
    result = _run(argv, {"RELAYQ_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/none"})
    assert result.returncode == 1
    assert "Postgres did not answer within 1s" in result.stderr


@pytest.mark.process
@pytest.mark.parametrize(
    ("argv", "name"),
    [([sys.executable, "-c", "import ingest_service.main as m; m.main()"], "relayq-ingest"),
     ([sys.executable, "-c", "import admin_service.main as m; m.main()"], "relayq-admin"),
     ([sys.executable, "-c", "import router_service.main as m; m.main()"], "relayq-router"),
     ([sys.executable, "-c", "import relayq.cli as c; c.main()", "migrate"], "relayq")],
    ids=["ingest", "admin", "router", "relayq migrate"])
@pytest.mark.parametrize(
    ("dsn", "says"),
    [(dsn_for("relayq_no_such_database"), 'database "relayq_no_such_database" does not exist'),
     (SERVER_DSN.replace("postgres@", "relayq_no_such_role@", 1),
      'role "relayq_no_such_role" does not exist')],
    ids=["missing database", "unknown role"])
def test_a_database_that_refuses_us_stops_every_process_at_once_with_its_message(
        argv: list[str], name: str, dsn: str, says: str) -> None:
    """Only a Postgres that does not answer is waited for (30 s by default)."""
    assert "postgres@" in SERVER_DSN
    started = time.monotonic()
    result = _run(argv, {"RELAYQ_DATABASE_URL": dsn, "RELAYQ_ADMIN_TOKEN": "x" * 24,
                         "RELAYQ_INGEST_ADDRESS": "127.0.0.1:0",
                         "RELAYQ_ADMIN_ADDRESS": "127.0.0.1:0",
                         "RELAYQ_ROUTER_ADDRESS": "127.0.0.1:0",
                         "RELAYQ_INGEST_METRICS_ADDRESS": "off",
                         "RELAYQ_ADMIN_METRICS_ADDRESS": "off",
                         "RELAYQ_ROUTER_METRICS_ADDRESS": "off", "RELAYQ_LOG_FORMAT": "json",
                         "RELAYQ_SECRET_KEYS": TEST_SECRET_KEY,
                         # One process; tests/process/test_workers.py has the supervisors' case.
                         "RELAYQ_INGEST_WORKERS": "1", "RELAYQ_ROUTER_WORKERS": "1"})
    assert time.monotonic() - started < 2.0 + 1.5  # and the interpreter's start
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"{name}: Postgres refused the connection: {says}")
    assert "Traceback" not in result.stderr
