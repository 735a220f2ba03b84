"""What every sender is, and what the router hands each one.

A sender delivers a batch of jobs to one destination and says, per job, what the destination
answered (router_service.retry.Result). It does no bookkeeping: order, retries and recording
are the lane's and the barrier's. Senders hold connections, so the router makes one per
destination and closes it when the destination's delivery settings change or its lane goes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields

from jobsdb.catalog import Destination
from router_service.channels import GrpcChannels
from router_service.httpclient import HttpPool
from router_service.model import Job
from router_service.resolver import Resolver
from router_service.retry import Result
from router_service.trust import Trust


class Sender(ABC):
    """The base of every sender. What a sender may do beyond delivering one job at a time
    (batches, byte limits, connections to close) has a default here, the plainest behaviour:
    a new capability is a new attribute or method with its default in this class, and only
    the senders that have it change."""

    # Jobs per deliver() call at most (1: one job per request).
    max_batch: int = 1
    # Jobs of one user a call may carry (in order): 1 when the destination may process a
    # batch's jobs in any order or concurrently; more only when it takes a batch whole, in
    # order (a webhook's JSON array).
    per_user: int = 1
    # Payload bytes per call at most (None: no limit beyond max_batch).
    max_bytes: int | None = None

    @abstractmethod
    async def deliver(self, jobs: Sequence[Job]) -> list[Result]:
        """One result per job, in the jobs' order. Never raises for the destination's
        failures (they are results); a raise is a bug, and the lane retries the jobs."""

    async def close(self) -> None:  # noqa: B027 - a default: most senders hold nothing
        """Let go of what the sender holds (connections); by default nothing."""


@dataclass(frozen=True, slots=True)
class SenderContext:
    """What senders share across destinations."""

    # The router's HTTP connections: kept alive, pooled per origin (scheme, host, port).
    http: HttpPool
    # Certificate authorities for https:// and grpcs:// (RELAYQ_DESTINATION_CA_FILE).
    trust: Trust
    # Jobs per Deliver call to a gRPC destination (RELAYQ_ROUTER_GRPC_BATCH).
    grpc_batch: int
    # gRPC channels, one per server, shared by its destinations.
    grpc_channels: GrpcChannels
    # Where every destination's host leads, checked against the network policy at every
    # attempt (router_service.resolver); senders connect only to the addresses it returns.
    resolver: Resolver


# Destination columns the lane applies itself (retry policy, rate, concurrency, pausing, the
# circuit breaker);
# a change to any other column makes a new sender.
_LANE_FIELDS = frozenset({
    "name", "min_backoff_ms", "max_backoff_ms", "max_attempts", "max_retry_window_s",
    "rate_per_second", "rate_burst", "concurrency", "paused", "created_at", "updated_at",
    "circuit_after_s", "circuit_min_failures", "circuit_probe_s", "circuit_opened_at",
    "circuit_reason",
})
_SENDER_FIELDS = tuple(f.name for f in fields(Destination) if f.name not in _LANE_FIELDS)


def needs_new_sender(old: Destination, new: Destination) -> bool:
    """Did a setting the sender was built from change (endpoint, headers, timeout, signing
    secrets, ...)?"""
    return any(getattr(old, name) != getattr(new, name) for name in _SENDER_FIELDS)
