"""Trace context from sender to receiver: a W3C traceparent given to ingest (an event's field,
or the request's metadata) is kept with the event, shown on its jobs, and sent on by the
router, so a real webhook receiver, a real NATS consumer and a gRPC sink read the sender's
trace id. Bad values: a malformed field rejects its event; malformed metadata is ignored and
counted. With an OpenTelemetry SDK in the router, each attempt is a span, child of the
sender's, and what is sent on names that span."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from admin_service.config import AdminConfig
from admin_service.main import AdminApp
from relayq.cli import lines
from relayq.client import traceparent as tracecontext
from relayq.client.errors import InvalidEvent
from relayq.client.events import encode
from relayq.client.ids import MessageIds
from relayq.config import Env
from relayq.v1 import admin_pb2, common_pb2, ingest_pb2
from router_service import tracing
from router_service.model import Job
from tests.helpers import auth, event
from tests.natsstreams import NATS_URL, connected, made_stream, nats_destination
from tests.pipeline import World, wait_until_finished
from tests.poll import eventually
from tests.services import OPERATOR_TOKEN, Admin, Ingest, admin, ingest, quiet_env, router
from tests.sinks import Answer

AUTH = Admin.auth()
SENDER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
Status = ingest_pb2.EventResult.Status


def traced(message_id: str, user: str = "u1", traceparent: str = SENDER) -> ingest_pb2.Event:
    sent = event(message_id, user)
    sent.traceparent = traceparent
    return sent


async def ingest_events(service: Ingest, world: World, events: list[ingest_pb2.Event], *,
                        metadata: str | None = None, partial: bool = False
                        ) -> ingest_pb2.IngestResponse:
    extra = (("traceparent", metadata),) if metadata is not None else ()
    response: ingest_pb2.IngestResponse = await service.stub.Ingest(
        ingest_pb2.IngestRequest(events=events, partial_success=partial),
        metadata=(*auth(world.source.write_key), *extra), timeout=10)
    return response


# --- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "why"), [
    (SENDER, None),
    (OTHER, None),
    (SENDER.upper(), "lowercase"),
    ("ff" + SENDER[2:], "version ff is invalid"),
    ("01" + SENDER[2:] + "-extra", "version '01' is not supported"),
    ("01" + SENDER[2:], "version '01' is not supported"),
    ("00-" + "0" * 32 + SENDER[35:], "trace id is all zeros"),
    (SENDER[:36] + "0" * 16 + SENDER[52:], "parent id is all zeros"),
    (SENDER[:-1], "expected 55 characters"),
    (SENDER + "0", "expected 55 characters"),
    (SENDER.replace("-", "_"), "expected 00-"),
    (SENDER[:10] + "g" + SENDER[11:], "expected 00-"),
    ("", "expected 55 characters"),
])
def test_one_check_for_producer_and_ingest_by_the_w3c_rules(value: str, why: str | None
                                                            ) -> None:
    problem = tracecontext.problem(value)
    if why is None:
        assert problem is None
        assert tracecontext.trace_id(value) == value[3:35]
    else:
        assert problem is not None
        assert why in problem, problem


def test_the_producer_refuses_a_malformed_traceparent_and_sends_a_good_one() -> None:
    common: dict[str, Any] = dict(
        message_id="m", user_id="u", anonymous_id=None, event="e", type="track",
        properties={}, context=None, timestamp=None, destination_ids=(),
        max_event_bytes=65536)
    with pytest.raises(InvalidEvent, match="traceparent: version ff is invalid"):
        encode(MessageIds(), **common, traceparent="ff" + SENDER[2:])
    frame, _, _ = encode(MessageIds(), **common, traceparent=SENDER)
    assert SENDER.encode() in frame
    frame, _, _ = encode(MessageIds(), **common, traceparent="")
    assert b"00-" not in frame


def test_the_producer_takes_the_current_opentelemetry_span(
        monkeypatch: pytest.MonkeyPatch) -> None:
    common: dict[str, Any] = dict(
        message_id="m", user_id="u", anonymous_id=None, event="e", type="track",
        properties={}, context=None, timestamp=None, destination_ids=(),
        max_event_bytes=65536)
    frame, _, _ = encode(MessageIds(), **common)  # nothing current: none sent
    assert b"00-" not in frame
    with _sdk(monkeypatch) as (provider, _), \
            provider.get_tracer("app").start_as_current_span("checkout") as span:
        frame, _, _ = encode(MessageIds(), **common)
        own = span.get_span_context()
        assert tracecontext.make(own.trace_id, own.span_id, own.trace_flags).encode() in frame
        frame, _, _ = encode(MessageIds(), **common, traceparent=OTHER)  # given wins
        assert OTHER.encode() in frame


# --- ingest -------------------------------------------------------------------------------------


async def test_a_malformed_field_rejects_its_event_as_any_invalid_field(world: World) -> None:
    bad = traced("bad", traceparent="00-" + "0" * 32 + SENDER[35:])
    async with ingest(world.database) as service:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ingest_events(service, world, [traced("good"), bad])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "events[1].traceparent: the trace id is all zeros" in (
            refused.value.details() or "")
        cur = await world.conn.execute("SELECT count(*) FROM events")
        assert (await cur.fetchone() or [1])[0] == 0  # nothing stored

        answer = await ingest_events(service, world, [traced("good"), bad], partial=True)
        assert [r.status for r in answer.results] == [Status.ACCEPTED, Status.REJECTED]
        assert answer.results[1].reason == "traceparent: the trace id is all zeros"
    cur = await world.conn.execute("SELECT message_id, traceparent FROM events")
    assert await cur.fetchall() == [("good", SENDER)]


async def test_metadata_is_the_default_and_a_malformed_one_is_ignored_and_counted(
        world: World) -> None:
    def ignored() -> float:
        return REGISTRY.get_sample_value("relayq_ingest_ignored_traceparents_total") or 0.0

    before = ignored()
    async with ingest(world.database) as service:
        await ingest_events(service, world, [event("plain"), traced("own", traceparent=OTHER)],
                            metadata=SENDER)
        answer = await ingest_events(service, world, [event("malformed-md")],
                                     metadata="00-not-a-traceparent")
        assert answer.accepted == 1
        await ingest_events(service, world, [event("none")])
    assert ignored() == before + 1
    cur = await world.conn.execute("SELECT message_id, traceparent FROM events ORDER BY event_id")
    assert await cur.fetchall() == [("plain", SENDER), ("own", OTHER), ("malformed-md", None),
                                    ("none", None)]


# --- through the router, to each kind of receiver ---------------------------------------------


async def test_a_webhook_receiver_reads_the_senders_trace_and_getjob_shows_it(
        world: World) -> None:
    await world.destination("hook")
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        answer = await ingest_events(service, world, [traced("t1", "alice"), event("n1", "bob")])
        await ingest_events(service, world, [event("m1", "carol")], metadata=OTHER)
        await wait_until_finished(world.conn, 3)
        by_message = {r.message_id: r for r in world.webhook.oks}
        assert by_message["t1"].headers["traceparent"] == SENDER
        assert tracecontext.trace_id(by_message["t1"].headers["traceparent"]) == SENDER[3:35]
        assert "traceparent" not in by_message["n1"].headers
        assert by_message["m1"].headers["traceparent"] == OTHER

        job_id = by_message["t1"].job_id
        job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id), metadata=AUTH)
        assert job.traceparent == SENDER
        untraced = await adm.stub.GetJob(
            admin_pb2.GetJobRequest(job_id=by_message["n1"].job_id), metadata=AUTH)
        assert untraced.traceparent == ""
        listed = await adm.stub.ListJobs(admin_pb2.ListJobsRequest(
            filter="destination = 'hook'"), metadata=AUTH)
        assert {j.message_id: j.traceparent for j in listed.jobs} == {
            "t1": SENDER, "n1": "", "m1": OTHER}
        assert answer.results[0].event_id


async def test_a_failed_job_keeps_its_trace_on_its_retries(world: World) -> None:
    """A retried job comes from its row (queue.sql pickup), not the log read."""
    await world.destination("hook")
    world.webhook.answer = lambda d: Answer(503 if d.attempt == 1 else 200)
    async with ingest(world.database) as service, router(world.database), \
            admin(world.database) as adm:
        await ingest_events(service, world, [traced("t1")])
        await world.webhook.wait_for(lambda: any(r.message_id == "t1" for r in world.webhook.oks))
        attempts = [r for r in world.webhook.received if r.message_id == "t1"]
        assert [r.attempt for r in attempts][:2] == [1, 2]
        assert {r.headers["traceparent"] for r in attempts} == {SENDER}

        async def succeeded() -> Any:
            job = await adm.stub.GetJob(admin_pb2.GetJobRequest(job_id=attempts[0].job_id),
                                        metadata=AUTH)
            return job if job.state == common_pb2.JOB_STATE_SUCCEEDED else None

        job = await eventually(succeeded)  # recorded moments after the answer
        assert job.traceparent == SENDER
        assert len(job.history) >= 2


async def test_a_batch_lists_each_events_traceparent_in_array_order(world: World) -> None:
    await world.destination("batched", batch_max_events=50, batch_linger_ms=200)
    async with ingest(world.database) as service, router(world.database):
        await ingest_events(service, world, [traced("a", "u1"), event("b", "u2"),
                                             traced("c", "u3", OTHER)])
        await wait_until_finished(world.conn, 3)
    seen: dict[str, str] = {}
    for delivery in world.webhook.oks:
        ids = [int(j) for j in delivery.headers["X-Relayq-Job-Ids"].split(",")]
        # Absent from a batch of untraced events only.
        listed = delivery.headers.get("X-Relayq-Traceparents", "," * (len(ids) - 1)).split(",")
        assert len(listed) == len(ids)
        seen[delivery.message_id] = listed[ids.index(delivery.job_id)]
        if len(set(listed)) == 1 and listed[0]:
            assert delivery.headers["traceparent"] == listed[0]
    assert seen == {"a": SENDER, "b": "", "c": OTHER}


async def test_a_nats_consumer_reads_the_senders_trace(world: World) -> None:
    async with connected() as client, made_stream(client) as stream:
        await nats_destination(world, "bus", f"{NATS_URL}/{stream.prefix}.{{user_id}}")
        async with ingest(world.database) as service, router(world.database):
            await ingest_events(service, world, [traced("t1", "alice"), event("n1", "bob")])
            await wait_until_finished(world.conn, 2)
        consumer = await stream.js.pull_subscribe(f"{stream.prefix}.>", stream=stream.name)
        messages = await consumer.fetch(2, timeout=10)
        for message in messages:
            await message.ack()
        headers = {(m.headers or {})["X-Relayq-Message-Id"]: m.headers or {} for m in messages}
        assert headers["t1"]["traceparent"] == SENDER
        assert tracecontext.trace_id(headers["t1"]["traceparent"]) == SENDER[3:35]
        assert "traceparent" not in headers["n1"]
        await consumer.unsubscribe()


async def test_a_grpc_sink_reads_the_trace_in_the_field_and_the_metadata(world: World) -> None:
    await world.destination("sink", kind="grpc")
    async with ingest(world.database) as service, router(world.database):
        await ingest_events(service, world, [traced("t1", "alice"), event("n1", "bob")])
        await wait_until_finished(world.conn, 2)
    by_message = {r.message_id: r for r in world.grpc_sink.oks}
    assert world.grpc_sink.traceparents[by_message["t1"].job_id] == SENDER
    assert world.grpc_sink.traceparents[by_message["n1"].job_id] == ""
    for batch in world.grpc_sink.batches:
        sent = {world.grpc_sink.traceparents[j] for j in batch}
        first = next(r for r in world.grpc_sink.oks if r.job_id == batch[0])
        if sent == {SENDER}:
            assert first.headers["traceparent"] == SENDER
        else:
            assert "traceparent" not in first.headers


# --- with an OpenTelemetry SDK in the router ----------------------------------------------------


@contextlib.contextmanager
def _sdk(monkeypatch: pytest.MonkeyPatch
         ) -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """An SDK as the process's tracer provider for the test only (the API sets one once per
    process; the test puts the previous one back)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


async def test_with_an_sdk_each_attempt_is_a_child_span_and_its_id_is_sent_on(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    await world.destination("hook")
    world.webhook.answer = lambda d: Answer(503 if d.attempt == 1 else 200)
    with _sdk(monkeypatch) as (_, exporter):
        async with ingest(world.database) as service, router(world.database):
            await ingest_events(service, world, [traced("t1"), event("n1", "bob")])
            await world.webhook.wait_for(lambda: {r.message_id for r in world.webhook.oks}
                                         == {"t1", "n1"})
        spans = [s for s in exporter.get_finished_spans() if s.name == "relayq deliver webhook"]
    attempts = [r for r in world.webhook.received if r.message_id == "t1"]
    assert len(spans) == len(attempts) >= 2  # one per attempt, none for the untraced event
    sent = {r.attempt: r.headers["traceparent"] for r in attempts}
    for span in spans:
        assert span.parent is not None
        assert (span.parent.trace_id, span.parent.span_id) == (int(SENDER[3:35], 16),
                                                               int(SENDER[36:52], 16))
        own = span.context
        attempt = span.attributes["relayq.attempt"] if span.attributes else 0
        assert sent[int(attempt)] == tracecontext.make(own.trace_id, own.span_id,
                                                       own.trace_flags)
    outcomes = sorted(str((s.attributes or {})["relayq.outcome"]) for s in spans)
    assert outcomes[0] == "ok"
    assert "retry" in outcomes
    assert "traceparent" not in next(r for r in world.webhook.oks
                                     if r.message_id == "n1").headers


# --- shown to operators -------------------------------------------------------------------------


@pytest.fixture
async def console(world: World) -> AsyncIterator[str]:
    app = await AdminApp.start(AdminConfig.from_env(Env(quiet_env(
        world.database, RELAYQ_ADMIN_CONSOLE_ADDRESS="127.0.0.1:0"))))
    assert app.console is not None
    try:
        yield app.console.url.rstrip("/")
    finally:
        await app.stop()


async def test_the_consoles_job_page_shows_the_traceparent(world: World, console: str) -> None:
    await world.destination("hook")
    async with ingest(world.database) as service, router(world.database):
        await ingest_events(service, world, [traced("t1")])
        await wait_until_finished(world.conn, 1)
    [delivered] = world.webhook.oks
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(f"{console}/sign-in") as page:
            csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
            assert csrf is not None
        async with session.post(f"{console}/sign-in", data={
                "csrf": csrf.group(1), "token": OPERATOR_TOKEN}) as answer:
            assert answer.status == 200
        async with session.get(f"{console}/jobs/{delivered.job_id}") as page:
            text = await page.text()
    assert re.search(rf'id="traceparent"[^>]*>{SENDER}<', text), text


def test_spans_of_a_call_that_raised_end_as_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [Job(1, "u", "m1", 1, "{}", datetime.now(UTC), None, 0, traceparent=SENDER),
            Job(2, "u2", "m2", 1, "{}", datetime.now(UTC), None, 0)]
    assert tracing.start("webhook", "d", jobs).traceparents == [SENDER, None]  # no SDK
    sent: list[str | None] = []

    def cancelled() -> None:
        with tracing.start("nats", "d", jobs) as attempt:
            sent.extend(attempt.traceparents)
            raise asyncio.CancelledError

    with _sdk(monkeypatch) as (_, exporter):
        with pytest.raises(asyncio.CancelledError):
            cancelled()
        [span] = exporter.get_finished_spans()
    assert sent[0] is not None
    assert sent[0] != SENDER
    assert sent[0][3:35] == SENDER[3:35]  # the router's span, in the sender's trace
    assert sent[1] is None
    assert span.kind == trace.SpanKind.PRODUCER
    assert span.status.status_code == trace.StatusCode.ERROR
    assert (span.attributes or {})["error.type"] == "CancelledError"


def test_relayq_send_takes_a_traceparent_per_line() -> None:
    parsed = lines.parse(b'{"user_id": "u", "traceparent": "' + SENDER.encode() + b'"}')
    assert parsed == {"user_id": "u", "traceparent": SENDER}
