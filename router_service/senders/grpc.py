"""Delivery to gRPC sinks: relayq.v1.Destination/Deliver, many jobs per call.

A batch never holds two jobs of one user (only the head of each user's queue is ready), so the
sink may process a batch in any order, concurrently, and still see every user's events in order.

`grpcs://` endpoints are reached over TLS (router_service.trust), and the destination's headers
travel as call metadata: a third-party sink's credentials usually go there.

Trace context (router_service.tracing): each Delivery carries its event's W3C traceparent
(Delivery.traceparent); when every delivery of a call carries the same one, the call's
metadata `traceparent` names it too, so a sink instrumented with OpenTelemetry's gRPC
instrumentation joins the trace without reading the field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from jobsdb.catalog import Destination
from relayq import endpoints
from relayq.netpolicy import IPAddress
from relayq.v1 import destination_pb2, destination_pb2_grpc
from router_service import tracing
from router_service.model import Job
from router_service.resolver import BlockedAddress
from router_service.retry import Result, Verdict
from router_service.senders.base import Sender, SenderContext

# The enum's values as plain ints: reading them through the enum wrapper costs a Python
# __getattr__ per job (5% of the router's CPU, measured).
_OK = destination_pb2.DeliveryResult.OK
_ABORT = destination_pb2.DeliveryResult.ABORT
_SUCCESS = Result(Verdict.OK)

# A call that failed as a whole: the batch itself was refused (abort), or anything else
# (unavailable, deadline, overloaded, a sink bug) that may pass (retry).
_ABORT_CODES = {grpc.StatusCode.INVALID_ARGUMENT}

log = logging.getLogger(__name__)


class GrpcSender(Sender):
    # A batch never holds two jobs of one user (the default per_user): the sink may process
    # it in any order.

    def __init__(self, destination: Destination, context: SenderContext) -> None:
        self.max_batch = context.grpc_batch
        self._destination_id = destination.id
        self._timeout = destination.timeout_ms / 1000
        # The admin service refuses endpoints and headers gRPC cannot use. A row written
        # otherwise (before these rules, or by hand) fails its deliveries with the reason
        # (retried: the operator can fix it) instead of the lane; headers gRPC cannot carry
        # are left out, as all were before gRPC destinations sent any.
        self._unusable: str | None = None
        self._metadata, refused = endpoints.split_metadata(destination.headers)
        for reason in refused:
            log.warning("gRPC destination %s: %s; sent without it", destination.id, reason,
                        extra={"destination": destination.id})
        try:
            endpoint = endpoints.parse_grpc(destination.endpoint)
        except endpoints.NotForGrpc as exc:
            self._unusable = str(exc)
            endpoint = endpoints.GrpcEndpoint(destination.endpoint, tls=False)  # never called
        self._channels = context.grpc_channels
        self._endpoint = endpoint
        # The addresses the endpoint led to at the last attempt, and the channel to them.
        self._addresses: tuple[IPAddress, ...] = ()
        self._stub: destination_pb2_grpc.DestinationAsyncStub | None = None

    async def _stub_for_now(self) -> destination_pb2_grpc.DestinationAsyncStub:
        """A stub on a channel to where the endpoint leads now, checked by the network policy
        at every attempt (BlockedAddress, or OSError when the name does not resolve)."""
        addresses = await self._channels.addresses(self._endpoint)
        if addresses != self._addresses or self._stub is None:
            if self._stub is not None:
                await self._channels.release(self._endpoint, self._addresses)
                self._stub = None
            channel = self._channels.acquire(self._endpoint, addresses)
            self._addresses = addresses
            self._stub = destination_pb2_grpc.DestinationStub(channel)
        return self._stub

    async def deliver(self, jobs: Sequence[Job]) -> list[Result]:
        with tracing.start("grpc", self._destination_id, jobs) as attempt:
            results = await self._deliver(jobs, attempt)
            attempt.finish(results)
        return results

    async def _deliver(self, jobs: Sequence[Job], attempt: tracing.Attempt) -> list[Result]:
        if self._unusable is not None:
            return [Result(Verdict.RETRY, "config", self._unusable)] * len(jobs)
        try:
            stub = await self._stub_for_now()
        except BlockedAddress as exc:  # no channel was made: nothing connected
            return [Result(Verdict.ABORT, exc.error_code, str(exc))] * len(jobs)
        except OSError as exc:
            return [Result(Verdict.RETRY, "connection", f"{type(exc).__name__}: {exc}")
                    ] * len(jobs)
        # Added in place: a Delivery made on its own and then copied into the list costs
        # three times as much, and this runs for every job.
        request = destination_pb2.DeliverRequest(destination_id=self._destination_id)
        add = request.deliveries.add
        for j, t in zip(jobs, attempt.traceparents, strict=True):
            add(job_id=j.job_id, message_id=j.message_id, user_id=j.user_id,
                attempt=j.attempt, payload_json=j.payload, traceparent=t or "")
        metadata = self._metadata
        shared = attempt.shared()
        if shared is not None:
            metadata = (*[m for m in metadata if m[0] != "traceparent"],
                        ("traceparent", shared))
        try:
            response = await stub.Deliver(request, timeout=self._timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            verdict = Verdict.ABORT if code in _ABORT_CODES else Verdict.RETRY
            return [Result(verdict, _error_code(code, details), details)] * len(jobs)
        answers = response.results
        if len(answers) == len(jobs) and all(
                a.outcome == _OK and a.job_id == j.job_id
                for a, j in zip(answers, jobs, strict=True)):
            return [_SUCCESS] * len(jobs)  # the usual answer: each job OK, in order
        by_job = {r.job_id: r for r in answers}
        return [_result(by_job.get(j.job_id)) for j in jobs]

    async def close(self) -> None:
        """Lets go of the channel; it closes when no destination uses it any more."""
        if self._stub is not None:
            self._stub = None
            await self._channels.release(self._endpoint, self._addresses)


def _error_code(code: grpc.StatusCode, details: str) -> str:
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    # A certificate that fails verification reaches us only as words in an UNAVAILABLE;
    # named as the webhooks name it, it is the destination's to fix, not a network blip.
    if code == grpc.StatusCode.UNAVAILABLE and "handshake" in details.lower():
        return "tls"
    return f"grpc:{code.name}"


def _result(answer: destination_pb2.DeliveryResult | None) -> Result:
    if answer is None:
        return Result(Verdict.RETRY, "missing", "the sink's answer had no result for this job")
    outcome = answer.outcome
    if outcome == _OK:
        return _SUCCESS
    retry_after = answer.retry_after_ms / 1000 if answer.retry_after_ms else None
    if outcome == _ABORT:
        return Result(Verdict.ABORT, "sink:abort", answer.error)
    return Result(Verdict.RETRY, "sink:retry", answer.error, retry_after)
