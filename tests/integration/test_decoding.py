"""Requests whose bytes do not decode: INVALID_ARGUMENT with a short message, on every service,
counted, and logged at most once per interval (never a traceback per request)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from relayq.v1 import ingest_pb2
from tests.services import admin, ingest, router

INVALID_UTF8_MESSAGE_ID = b"\x0a\x03" + b"\x0a\x01\xff"  # events[0].message_id = b"\xff"
CORRUPT = b"\xff\xff\xff"


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    length, size = b"", len(payload)
    while True:
        byte, size = size & 0x7F, size >> 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            break
    return bytes([number << 3 | 2]) + length + payload


def _deeply_nested_request(levels: int = 120) -> bytes:
    """A Struct nested past protobuf's recursion limit (100). Built by hand: the library
    refuses to build one."""
    struct = b""
    for _ in range(levels):
        value = _field(5, struct)  # Value.struct_value
        struct = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields["a"]
    event = _field(1, b"m") + _field(2, b"u") + _field(8, struct)  # Event.properties
    return _field(1, event)  # IngestRequest.events


async def _call(channel: grpc.aio.Channel, method: str, raw: bytes) -> grpc.aio.AioRpcError:
    call = channel.unary_unary(method)  # no serializers: the bytes go as they are
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(raw, timeout=10)
    return caught.value


def _undecodable(method: str) -> float:
    value = REGISTRY.get_sample_value("relayq_rpc_undecodable_requests_total",
                                      {"method": method})
    return value or 0.0


@pytest.mark.parametrize(
    "raw", [INVALID_UTF8_MESSAGE_ID, CORRUPT, _deeply_nested_request()],
    ids=["invalid utf-8 in a string", "corrupt wire bytes", "Struct nested too deep"])
async def test_undecodable_ingest_requests_are_invalid_argument(
        database: str, raw: bytes, caplog: pytest.LogCaptureFixture) -> None:
    method = "/relayq.v1.Ingest/Ingest"
    before = _undecodable(method)
    async with ingest(database) as service:
        with caplog.at_level(logging.INFO):
            error = await _call(service.channel, method, raw)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(
        f"the request to {method} could not be decoded: Error parsing message")
    assert _undecodable(method) == before + 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("start", "method"),
    [(admin, "/relayq.v1.Admin/CreateTenant"), (admin, "/relayq.v1.Admin/ListJobs"),
     (router, "/relayq.v1.RouterStatus/GetStatus"), (ingest, "/grpc.health.v1.Health/Check")],
    ids=["admin create", "admin list jobs", "router status", "health"])
async def test_every_service_answers_undecodable_requests_invalid_argument(
        database: str, start: Any, method: str) -> None:
    async with start(database) as service:
        error = await _call(service.channel, method, CORRUPT)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "could not be decoded" in (error.details() or "")


async def test_a_flood_of_undecodable_requests_logs_one_line(
        database: str, caplog: pytest.LogCaptureFixture) -> None:
    async with ingest(database) as service:
        with caplog.at_level(logging.INFO):
            for _ in range(50):
                await _call(service.channel, "/relayq.v1.Ingest/Ingest", CORRUPT)
            # A well-formed request is still served (and refused for what it lacks).
            with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
                await service.stub.Ingest(ingest_pb2.IngestRequest(), timeout=10)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    lines = [r for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(lines) == 1
    assert not [r for r in caplog.records if r.exc_info]
