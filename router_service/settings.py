"""What the router's engine is given (router_service.config reads it from RELAYQ_ROUTER_*
variables; benchmarks and tests make their own). A module of its own so that the
configuration does not import the engine it configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from relayq.netpolicy import NetworkPolicy


@dataclass(frozen=True)
class EngineSettings:
    router_id: str
    lease: timedelta
    # Jobs read per pickup, and held in memory per destination at most.
    batch: int
    max_held: int
    # Requests in flight at once over all destinations (shared fairly).
    permits: int
    grpc_batch: int
    poll_seconds: float
    flush_delay: float
    # Outcomes and parkings per transaction at most, and such transactions in flight at once.
    flush_max: int
    flush_concurrency: int = 2
    # A lane holding more jobs than this reads alone; the others' reads are grouped.
    read_alone_above: int = 100
    # Rows one grouped read may return at most, and grouped reads in flight at once.
    read_max_rows: int = 50000
    read_concurrency: int = 2
    # A lane with nothing to do for this long is closed.
    lane_idle_seconds: float = 60.0
    # Ids read ahead of what is decided, per partition of the log (0: the batch), and the
    # documents' bytes read ahead over all partitions at most (router_service.logread).
    log_window: int = 0
    log_window_bytes: int = 64 * 1024 * 1024
    # Extra certificate authorities for https:// and grpcs:// destinations (router_service.trust).
    destination_ca_file: Path | None = None
    # Where destinations may connect (relayq.netpolicy): public addresses and these networks.
    destination_policy: NetworkPolicy = field(default_factory=NetworkPolicy)
