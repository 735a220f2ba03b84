"""A producer's settings, validated when the producer is made (never on first use).

Producer and AsyncProducer take the same keyword arguments; each becomes a field here.
Defaults follow what Kafka's producer and the Segment/RudderStack libraries do, scaled to
ingest's limits (relayq.client.limits): batches of up to 500 events or 1 MiB, a 10 ms linger,
four batches in flight, a buffer of 10,000 events or 32 MiB that blocks senders for up to 30 s
when full, 10 s per call and two minutes to get each event acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relayq.client import limits
from relayq.client.errors import InvalidOption

WhenFull = Literal["block", "raise"]

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True, kw_only=True)
class Options:
    # relayq-ingest's host:port.
    address: str = DEFAULT_ADDRESS
    # The source's write key (sent as `authorization: Bearer <key>`).
    write_key: str
    # TLS with gRPC's default root certificates; ca_file trusts that PEM instead (and turns
    # TLS on by itself).
    tls: bool = False
    ca_file: str | Path | None = None
    # A batch closes at this many events or bytes (serialised), whichever comes first.
    batch_events: int = 500
    batch_bytes: int = 1024 * 1024
    # How long the first event of a batch waits for others to join it. A batch also goes as
    # soon as it is full, and on flush() and close().
    linger_ms: float = 10.0
    # Batches in flight at once. Each is an ordered lane: a user's events always take the
    # same lane, and a lane sends its next batch only when the previous one is answered.
    in_flight: int = 4
    # Events (and their bytes) held at once, from send() until ingest answers.
    buffer_events: int = 10_000
    buffer_bytes: int = 32 * 1024 * 1024
    # A send() into a full buffer waits for room up to block_timeout seconds ("block"), or
    # raises BufferFull at once ("raise").
    when_full: WhenFull = "block"
    block_timeout: float = 30.0
    # The deadline of one Ingest call, in seconds.
    call_timeout: float = 10.0
    # Retries of a batch after UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED; None:
    # as many as fit in delivery_timeout.
    max_retries: int | None = None
    # Seconds from send() until an event is given up (DeliveryFailed) if still unanswered.
    delivery_timeout: float = 120.0
    # Exponential backoff between retries, full jitter, in seconds; never shorter than the
    # RetryInfo ingest sends with RESOURCE_EXHAUSTED.
    backoff_min: float = 0.1
    backoff_max: float = 10.0
    # The largest event document ingest takes (its RELAYQ_INGEST_MAX_EVENT_BYTES): bigger
    # events are refused by send() without a round trip.
    max_event_bytes: int = limits.MAX_EVENT_BYTES

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise InvalidOption(f"address: expected host:port, got {self.address!r}")
        if not self.write_key or not self.write_key.isprintable() or " " in self.write_key:
            raise InvalidOption("write_key: required (the source's write key, no spaces)")
        _within("batch_events", self.batch_events, 1, limits.MAX_BATCH_EVENTS)
        _within("max_event_bytes", self.max_event_bytes, 256, limits.MAX_REQUEST_BYTES)
        # A batch must hold at least one event of the largest size (plus its framing).
        _within("batch_bytes", self.batch_bytes, min(self.max_event_bytes + 1024,
                                                     limits.MAX_REQUEST_BYTES),
                limits.MAX_REQUEST_BYTES)
        _within("linger_ms", self.linger_ms, 0, 60_000)
        _within("in_flight", self.in_flight, 1, 256)
        _within("buffer_events", self.buffer_events, self.batch_events, 100_000_000)
        _within("buffer_bytes", self.buffer_bytes, self.batch_bytes, 1 << 40)
        if self.when_full not in ("block", "raise"):
            raise InvalidOption(f"when_full: expected 'block' or 'raise', got {self.when_full!r}")
        _within("block_timeout", self.block_timeout, 0, 86_400)
        _within("call_timeout", self.call_timeout, 0.001, 3600)
        if self.max_retries is not None:
            _within("max_retries", self.max_retries, 0, 1_000_000)
        _within("delivery_timeout", self.delivery_timeout, 0.001, 7 * 86_400)
        _within("backoff_min", self.backoff_min, 0.001, 3600)
        _within("backoff_max", self.backoff_max, self.backoff_min, 3600)
        if self.ca_file is not None:
            try:
                Path(self.ca_file).read_bytes()
            except OSError as exc:
                raise InvalidOption(f"ca_file: cannot read {self.ca_file}: {exc}") from None

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None


def _within(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOption(f"{name}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidOption(f"{name}: {value} is outside {low}..{high}")
