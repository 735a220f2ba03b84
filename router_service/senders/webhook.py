"""Delivery to HTTP webhooks: one signed POST of the event document per job, or of a JSON
array of many jobs' documents for a destination with a batch policy.

Every request carries, besides the destination's own headers:
- `X-Relayq-Message-Id`, `X-Relayq-Job-Id`, `X-Relayq-Attempt`: what relayq calls it;
- `webhook-id`, `webhook-timestamp`, `webhook-signature`: Standard Webhooks
  (router_service.signing).
  `webhook-id` is `msg_<job id>`: the same for every attempt of a job (and for an operator's
  replay of it), different for every other delivery, so a receiver that de-duplicates on it
  drops exactly the repeats that at-least-once delivery can cause. The timestamp is the
  attempt's own, so a retry an hour later is not refused as a replay.

A batch (batch_max_events above 1) is always an array, even of one event, in job order; a
user's jobs may travel several in one array (in order), never with or ahead of an earlier one
of theirs that failed. Its `webhook-id` is `msg_b<first job id>_<digest of the job ids>`: the
same when the same jobs are retried together; the events in it carry their own messageId.
X-Relayq-Job-Ids and X-Relayq-Attempts list each event's job id and attempt, in array order.

Trace context (router_service.tracing): a job whose event came with a W3C traceparent is sent
with header `traceparent`, so the receiver's trace joins the sender's. A batch lists every
event's in `X-Relayq-Traceparents`, comma-separated in array order, empty for an event sent
without one (headers rather than the body: the body is the events' documents exactly as
ingested, which receivers parse and verify as they are); when all the events share one, it
is also the batch's `traceparent`.
The answer is the whole batch's: 2xx all succeeded, a retryable status retries all, another
4xx gives all up.

The request is written once as bytes: the lines that are the same for every job of the
destination are built when the sender is (a changed endpoint, header or secret makes a new
sender), and only the per-job lines, the signature and the body are added per request.
Connections come from the router's pool (router_service.httpclient), kept alive per origin.
Only a bounded excerpt of an answer is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import ssl
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from jobsdb.catalog import Destination
from relayq.destination_types import WEBHOOK_OWN_HEADERS
from router_service import httpclient, signing, tracing
from router_service.model import Job
from router_service.resolver import BlockedAddress
from router_service.retry import Result, Verdict, classify_http, parse_retry_after
from router_service.senders.base import Sender, SenderContext

log = logging.getLogger(__name__)

# Successes by HTTP status, made once each: the answer a delivery's record keeps.
_OK = {status: Result(Verdict.OK, status=str(status)) for status in range(200, 300)}


def webhook_id(job_id: int) -> str:
    return f"msg_{job_id}"


def batch_id(job_ids: Sequence[int]) -> str:
    """A batch's webhook-id: stable for the same jobs, different for any other set."""
    digest = hashlib.blake2b(",".join(map(str, job_ids)).encode(), digest_size=8).hexdigest()
    return f"msg_b{job_ids[0]}_{digest}"


class WebhookSender(Sender):
    def __init__(self, destination: Destination, context: SenderContext) -> None:
        self.batched = destination.batch_max_events > 1
        self.max_batch = destination.batch_max_events
        self.per_user = destination.batch_max_events
        self.max_bytes: int | None = destination.batch_max_bytes if self.batched else None
        self._destination_id = destination.id
        self._pool = context.http
        self._timeout = destination.timeout_ms / 1000
        # A row the admin service would have refused (written by hand, or before a rule):
        # an endpoint nobody can send to aborts its jobs, naming why; a secret that is not a
        # secret fails them for a retry (the operator can rotate it).
        self._refused: Result | None = None
        try:
            self._target = httpclient.parse_target(destination.endpoint)
        except httpclient.InvalidURL as exc:
            self._refused = Result(Verdict.ABORT, "invalid_endpoint", str(exc))
        try:
            self._signer = signing.Signer((s.secret, s.expires_at)
                                          for s in destination.signing_secrets)
        except signing.BadSecret as exc:
            self._refused = self._refused or Result(Verdict.RETRY, "config",
                                                    f"signing secret: {exc}")
        self._fixed = _fixed_headers(destination, self._target.host_header
                                     if self._refused is None else "")

    async def deliver(self, jobs: Sequence[Job]) -> list[Result]:
        with tracing.start("webhook", self._destination_id, jobs) as attempt:
            traceparents = attempt.traceparents
            if self.batched:
                results = [await self._post_batch(jobs, attempt)] * len(jobs)
            else:
                results = [await self._post(job, traceparents[index])
                           for index, job in enumerate(jobs)]
            attempt.finish(results)
        return results

    async def _post_batch(self, jobs: Sequence[Job], attempt: tracing.Attempt) -> Result:
        ids = [job.job_id for job in jobs]
        msg_id = batch_id(ids)
        body = ("[" + ",".join([job.payload for job in jobs]) + "]").encode()
        lines = (f"X-Relayq-Job-Ids: {','.join(map(str, ids))}\r\n"
                 f"X-Relayq-Attempts: {','.join([str(job.attempt) for job in jobs])}\r\n")
        if any(attempt.traceparents):
            lines += ("X-Relayq-Traceparents:"
                      f" {','.join([t or '' for t in attempt.traceparents])}\r\n")
            shared = attempt.shared()
            if shared is not None:
                lines += f"traceparent: {shared}\r\n"
        result = await self._send(msg_id, body, lines)
        # Every job's history says which request carried it.
        return dataclasses.replace(result, batch=msg_id)

    async def _post(self, job: Job, traceparent: str | None) -> Result:
        lines = (f"X-Relayq-Message-Id: {job.message_id}\r\nX-Relayq-Job-Id: {job.job_id}\r\n"
                 f"X-Relayq-Attempt: {job.attempt}\r\n")
        if traceparent is not None:
            lines += f"traceparent: {traceparent}\r\n"
        return await self._send(webhook_id(job.job_id), job.payload.encode(), lines)

    async def _send(self, msg_id: str, body: bytes, lines: str) -> Result:
        """One signed POST of `body` (one event's document here; a batch's JSON array would
        be another), with the destination's fixed lines, `lines` (header lines of its own,
        each ending in CRLF) and the Standard Webhooks headers for `msg_id`."""
        if self._refused is not None:
            return self._refused
        timestamp = int(time.time())
        signature = self._signer.signature(msg_id, timestamp, body)
        head = (f"{self._fixed}{lines}webhook-id: {msg_id}\r\nwebhook-timestamp: {timestamp}\r\n"
                f"{f'webhook-signature: {signature}{_CRLF}' if signature else ''}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        try:
            response = await self._pool.request(self._target, head, body, self._timeout)
        except BlockedAddress as exc:  # nothing was sent: the policy refused the address
            return Result(Verdict.ABORT, exc.error_code, str(exc))
        except TimeoutError:
            return Result(Verdict.RETRY, "timeout", f"no answer within {self._timeout:g}s")
        # A certificate that fails verification (ssl.CertificateError is one) is the
        # destination's to fix, not a reason to abort every event meanwhile.
        except (ssl.SSLError, ssl.CertificateError) as exc:
            return Result(Verdict.RETRY, "tls", f"{type(exc).__name__}: {exc}")
        except OSError as exc:  # refused, reset, unresolvable, cut short, not HTTP
            return Result(Verdict.RETRY, "connection", f"{type(exc).__name__}: {exc}")
        verdict = classify_http(response.status)
        if verdict is Verdict.OK:
            return _OK[response.status]
        retry_after = (parse_retry_after(response.retry_after, datetime.now(UTC))
                       if verdict is Verdict.RETRY else None)
        return Result(verdict, str(response.status), response.body.decode(errors="replace"),
                      retry_after)

    async def close(self) -> None:
        """The pool is the router's, shared by every webhook destination."""


_CRLF = "\r\n"


def _fixed_headers(destination: Destination, host: str) -> str:
    """The header lines every request of this destination carries, in one string.

    The destination's headers may replace Host and User-Agent. The admin service refuses the
    names relayq sets itself and line breaks in values; a row written otherwise (by hand, or
    before those rules) has such headers left out, so it can neither forge a signature nor
    add headers of its own."""
    lines = {"host": f"Host: {host}", "user-agent": "User-Agent: relayq"}
    for name, value in destination.headers.items():
        if name.lower() in WEBHOOK_OWN_HEADERS or any(c in name + value for c in "\r\n\x00"):
            log.warning("webhook header %r left out: relayq sets it, or it is malformed", name,
                        extra={"destination": destination.id})
            continue
        lines[name.lower()] = f"{name}: {value}"
    lines["content-type"] = "Content-Type: application/json"
    return "".join(line + _CRLF for line in lines.values())
