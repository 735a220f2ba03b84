"""The demo's configuration, made through the admin API as an operator would make it.

Idempotent, so `relayq up` can run again on the same data folder: what exists is reused,
the source gets a fresh write key (a key is shown only when made), and the destinations are
pointed at wherever the demo sink listens this time.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from relayq.v1 import admin_pb2, admin_pb2_grpc, common_pb2

TENANT = "demo"
SOURCE = "demo-web"
HEALTHY = "demo-healthy"
FLAKY = "demo-flaky"

# Short backoff so that retries, and the later events held behind them, show within seconds.
DEMO_RETRY = common_pb2.RetryPolicy(
    min_backoff_ms=500, max_backoff_ms=10_000, max_attempts=8, max_retry_window_seconds=300)


@dataclass(frozen=True)
class Demo:
    tenant_id: str
    source_id: str
    write_key: str
    destination_ids: tuple[str, ...]


def _exists(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.ALREADY_EXISTS


async def configure(stub: admin_pb2_grpc.AdminAsyncStub, token: str, sink_url: str) -> Demo:
    """Create (or update) tenant, source, a healthy and a flaky webhook, and connect them."""
    auth = (("authorization", f"Bearer {token}"),)
    try:
        await stub.CreateTenant(
            admin_pb2.CreateTenantRequest(id=TENANT, name="Demo"), metadata=auth)
    except grpc.aio.AioRpcError as exc:
        if not _exists(exc):
            raise
    try:
        source = await stub.CreateSource(
            admin_pb2.CreateSourceRequest(id=SOURCE, tenant_id=TENANT, name="Demo web shop"),
            metadata=auth)
    except grpc.aio.AioRpcError as exc:
        if not _exists(exc):
            raise
        source = await stub.RotateWriteKey(
            admin_pb2.RotateWriteKeyRequest(source_id=SOURCE, grace_seconds=0), metadata=auth)
    endpoints = {HEALTHY: f"{sink_url}/healthy", FLAKY: f"{sink_url}/flaky"}
    for destination_id, endpoint in endpoints.items():
        try:
            await stub.CreateDestination(admin_pb2.CreateDestinationRequest(
                id=destination_id, tenant_id=TENANT, name=destination_id.replace("-", " "),
                type="webhook", endpoint=endpoint, retry_policy=DEMO_RETRY, timeout_ms=5000,
            ), metadata=auth)
        except grpc.aio.AioRpcError as exc:
            if not _exists(exc):
                raise
            await stub.UpdateDestination(admin_pb2.UpdateDestinationRequest(
                id=destination_id, endpoint=endpoint, retry_policy=DEMO_RETRY, paused=False,
            ), metadata=auth)
        try:
            await stub.ConnectSource(admin_pb2.ConnectSourceRequest(
                source_id=SOURCE, destination_id=destination_id), metadata=auth)
        except grpc.aio.AioRpcError as exc:
            if not _exists(exc):
                raise
    return Demo(TENANT, SOURCE, source.write_key, tuple(endpoints))
