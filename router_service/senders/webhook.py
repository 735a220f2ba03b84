"""Delivery to HTTP webhooks: one POST of the event document per job.

One aiohttp session for the whole router keeps connections alive per host, so a steady
destination costs no TCP or TLS handshake per event. Only a bounded excerpt of an answer is
read: a destination returning megabytes of HTML must not cost the router memory.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp

from jobsdb.catalog import Destination
from jobsdb.queue import RESPONSE_LIMIT
from router_service.model import Job
from router_service.retry import Result, Verdict, classify_http, parse_retry_after
from router_service.senders.base import SenderContext


class WebhookSender:
    max_batch = 1

    def __init__(self, destination: Destination, context: SenderContext) -> None:
        self._session = context.http
        self._url = destination.endpoint
        self._headers = {**destination.headers, "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=destination.timeout_ms / 1000)

    async def deliver(self, jobs: Sequence[Job]) -> list[Result]:
        return [await self._post(job) for job in jobs]

    async def _post(self, job: Job) -> Result:
        headers = {
            **self._headers,
            "X-Relayq-Message-Id": job.message_id,
            "X-Relayq-Job-Id": str(job.job_id),
            "X-Relayq-Attempt": str(job.attempt),
        }
        try:
            async with self._session.post(self._url, data=job.payload.encode(), headers=headers,
                                          timeout=self._timeout, allow_redirects=False) as resp:
                verdict = classify_http(resp.status)
                if verdict is Verdict.OK:
                    return Result(Verdict.OK)
                body = await resp.content.read(RESPONSE_LIMIT)
                retry_after = (parse_retry_after(resp.headers.get("Retry-After"), datetime.now(UTC))
                               if verdict is Verdict.RETRY else None)
                return Result(verdict, str(resp.status), body.decode(errors="replace"), retry_after)
        except TimeoutError:
            return Result(Verdict.RETRY, "timeout",
                          f"no answer within {self._timeout.total:g}s")
        except aiohttp.InvalidURL as exc:
            return Result(Verdict.ABORT, "invalid_endpoint", str(exc))
        # Before ValueError: a certificate that fails verification is one (ssl.CertificateError),
        # and an expired or misissued certificate is the destination's to fix, not a reason to
        # abort every event meanwhile.
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            return Result(Verdict.RETRY, "tls", f"{type(exc).__name__}: {exc}")
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return Result(Verdict.RETRY, "connection", f"{type(exc).__name__}: {exc}")
        except ValueError as exc:
            return Result(Verdict.ABORT, "invalid_endpoint", str(exc))

    async def close(self) -> None:
        """The session is the router's, shared by every webhook destination."""
