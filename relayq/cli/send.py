"""relayq send: events from JSON lines (files or stdin) to relayq-ingest, through the Producer.

Every event goes through relayq.client.Producer, as a service's events would: batched,
retried with backoff, de-duplicated by message id. What was not stored is written to
`--rejected FILE` as JSON lines ({"file", "line", "status", "reason", "event"}) with its
message id filled in, so the file can be fixed and sent again without storing anything twice.
Exit status: 0 when every event was accepted (or was a duplicate), 1 when any was rejected,
refused or not acknowledged, 2 for bad options or an unreadable file.

Refused is its own outcome: ingest answered, and refused the write key (UNAUTHENTICATED) or
the source (PERMISSION_DENIED, disabled), so the events are fine and nothing of them was
stored. The producer logs an error for every batch refused so; here the summary says it once,
so those log lines are left out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import grpc
import orjson

from relayq.cli import lines
from relayq.cli.progress import ProgressLine
from relayq.client import (
    DeliveryFailed,
    InvalidEvent,
    InvalidOption,
    Producer,
    SendResult,
)
from relayq.client.ids import MessageIds
from relayq.client.options import DEFAULT_ADDRESS
from relayq.config import ConfigError, Env


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser(
        "send", help="send events from JSON lines (files or stdin) to relayq-ingest",
        description=__doc__.split("\n\n")[0] + " Fields of each line: " + ", ".join(
            sorted(set(lines.FIELDS.values()))) + " (or their camelCase); see docs/client.md.")
    cmd.add_argument("files", nargs="*", metavar="FILE",
                     help="JSON lines files, read in order; none or '-': stdin")
    cmd.add_argument("--ingest", metavar="HOST:PORT",
                     help="relayq-ingest address"
                          f" (RELAYQ_INGEST_ADDRESS; default {DEFAULT_ADDRESS})")
    cmd.add_argument("--write-key", help="the source's write key (RELAYQ_WRITE_KEY; the"
                                         " variable keeps it out of shell history and ps)")
    cmd.add_argument("--ca-file", metavar="PEM",
                     help="CA certificate to verify ingest; turns on TLS (RELAYQ_INGEST_CA_FILE)")
    cmd.add_argument("--tls", action="store_true",
                     help="TLS with the default root certificates")
    cmd.add_argument("--rejected", type=Path, metavar="FILE",
                     help="write events not stored (rejected or not acknowledged) here")
    cmd.add_argument("--batch-events", type=int, default=500,
                     help="events per request (default 500)")
    cmd.add_argument("--in-flight", type=int, default=4,
                     help="requests in flight at once (default 4)")
    cmd.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                     help="give up on an event not acknowledged after this long (default 60)")
    cmd.set_defaults(run=run)


@dataclass
class Tally:
    """What the command itself saw, beside the producer's counters."""

    read: int = 0
    # Lines refused before sending: not JSON, not an event, or what send() refused.
    refused: int = 0
    # Events ingest refused whole for the write key or the source (REFUSALS).
    key_refused: int = 0
    first_failure: str = ""
    started: float = field(default_factory=time.monotonic)


class RejectedFile:
    """JSON lines of what was not stored; written from the producer's thread as answers come."""

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self._out: BinaryIO | None = None
        self.path = path
        self.count = 0
        if path is not None:
            try:
                self._out = path.open("wb")
            except OSError as exc:
                raise ConfigError("--rejected", f"cannot write {path}: {exc}") from None

    def write(self, source: str, line: int, status: str, reason: str,
              event: dict[str, Any] | None, text: bytes | None = None) -> None:
        record: dict[str, Any] = {"file": source, "line": line, "status": status,
                                  "reason": reason}
        if event is not None:
            record["event"] = event
        else:
            record["text"] = (text or b"").decode(errors="replace")
        with self._lock:
            self.count += 1
            if self._out is not None:
                self._out.write(orjson.dumps(record, default=str) + b"\n")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


def run(args: argparse.Namespace) -> int:
    env = Env()
    write_key = args.write_key or env.text("RELAYQ_WRITE_KEY", "")
    if not write_key:
        raise ConfigError("RELAYQ_WRITE_KEY", "no write key: use --write-key or RELAYQ_WRITE_KEY")
    address = (Env({"--ingest": args.ingest}).address("--ingest", DEFAULT_ADDRESS)
               if args.ingest else env.address("RELAYQ_INGEST_ADDRESS", DEFAULT_ADDRESS))
    ca_file = (Env({"--ca-file": args.ca_file}).file("--ca-file") if args.ca_file
               else env.file("RELAYQ_INGEST_CA_FILE"))
    sources = args.files or ["-"]
    for source in sources:
        if source != "-" and not Path(source).is_file():
            raise ConfigError(source, "no such file")
    try:
        producer = Producer(address=address, write_key=write_key, tls=args.tls,
                            ca_file=ca_file, batch_events=args.batch_events,
                            in_flight=args.in_flight, delivery_timeout=args.timeout)
    except InvalidOption as exc:
        raise ConfigError("relayq send", str(exc)) from None
    tally = Tally()
    rejected = RejectedFile(args.rejected)
    interrupted = False
    with ExitStack() as stack:
        stack.callback(rejected.close)
        client_log = logging.getLogger("relayq.client")
        client_log.addFilter(_said_in_the_summary)
        stack.callback(client_log.removeFilter, _said_in_the_summary)
        stack.enter_context(ProgressLine(lambda: _progress(producer, tally), sys.stderr))
        try:
            _send_all(producer, sources, tally, rejected)
            producer.close()
        except KeyboardInterrupt:
            interrupted = True
            producer.close(timeout=5)
    _summary(producer, tally, rejected, address, interrupted, sys.stdout)
    counters = producer.counters
    if interrupted:
        return 130
    return 1 if (tally.refused or counters.rejected or counters.dropped) else 0


def _send_all(producer: Producer, sources: list[str], tally: Tally,
              rejected: RejectedFile) -> None:
    ids = MessageIds()
    for source, number, text in _lines(sources):
        tally.read += 1
        try:
            fields = lines.parse(text)
        except lines.BadLine as exc:
            _refused(tally, rejected, source, number, str(exc), None, text)
            continue
        fields.setdefault("message_id", ids.new())
        try:
            handle = producer.send(**fields)
        except InvalidEvent as exc:
            _refused(tally, rejected, source, number, str(exc), fields, text)
            continue
        handle.add_done_callback(_on_answer(source, number, fields, tally, rejected))


def _refused(tally: Tally, rejected: RejectedFile, source: str, number: int, reason: str,
             event: dict[str, Any] | None, text: bytes) -> None:
    tally.refused += 1
    tally.first_failure = tally.first_failure or f"line {number}: {reason}"
    rejected.write(source, number, "rejected", reason, event, text)


def _on_answer(source: str, number: int, event: dict[str, Any], tally: Tally,
               rejected: RejectedFile
               ) -> Callable[[concurrent.futures.Future[SendResult]], None]:
    def answered(handle: concurrent.futures.Future[SendResult]) -> None:
        error = handle.exception()
        if error is None:
            result = handle.result()
            if result.rejected:
                rejected.write(source, number, "rejected", result.reason, event)
            return
        reason = str(error)  # DeliveryFailed or ProducerClosed: each names the gRPC code
        if isinstance(error, DeliveryFailed) and error.code in REFUSALS:
            tally.key_refused += 1
            tally.first_failure = tally.first_failure or (
                f"line {number}: ingest refused {REFUSALS[error.code]}: {reason}")
            rejected.write(source, number, "refused", reason, event)
            return
        tally.first_failure = tally.first_failure or f"line {number}: {reason}"
        rejected.write(source, number, "not acknowledged", reason, event)
    return answered


# Answers that refuse every event of a batch for who sent it, not for what: what was refused.
REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: "the write key (--write-key or RELAYQ_WRITE_KEY)",
    grpc.StatusCode.PERMISSION_DENIED: "the source",
}


def _said_in_the_summary(record: logging.LogRecord) -> bool:
    """Leave out the producer's error line for each batch refused for its key or source."""
    return getattr(record, "code", None) not in {code.name for code in REFUSALS}


def _lines(sources: list[str]) -> Iterator[tuple[str, int, bytes]]:
    for source in sources:
        with (open(source, "rb") if source != "-" else _stdin()) as stream:
            for number, text in enumerate(stream, 1):
                if text.strip():
                    yield source, number, text


def _stdin() -> BinaryIO:
    # Not closed by the `with` above: wrap so closing it leaves sys.stdin alone.
    return open(sys.stdin.fileno(), "rb", closefd=False)


def _progress(producer: Producer, tally: Tally) -> str:
    counters = producer.counters
    elapsed = max(1e-6, time.monotonic() - tally.started)
    answered = counters.accepted + counters.duplicate + counters.rejected
    return (f"relayq send: {tally.read:,} read · {counters.accepted:,} accepted ·"
            f" {counters.duplicate:,} duplicates · {counters.rejected + tally.refused:,}"
            f" rejected · {tally.key_refused:,} refused ·"
            f" {counters.dropped - tally.key_refused:,} failed · {answered / elapsed:,.0f}"
            " events/s")


def _summary(producer: Producer, tally: Tally, rejected: RejectedFile, address: str,
             interrupted: bool, out: TextIO) -> None:
    counters = producer.counters
    elapsed = time.monotonic() - tally.started
    stored = counters.accepted + counters.duplicate
    lines_out = [
        f"{'interrupted: ' if interrupted else ''}{tally.read:,} events read in {elapsed:.1f}s"
        f" ({stored / max(elapsed, 1e-6):,.0f} events/s) and sent to {address}:",
        f"  accepted           {counters.accepted:,}",
        f"  duplicates         {counters.duplicate:,}  (already stored, not stored again)",
        f"  rejected           {counters.rejected + tally.refused:,}",
        f"  refused            {tally.key_refused:,}  (the write key or the source: nothing"
        " stored)",
        f"  not acknowledged   {counters.dropped - tally.key_refused:,}",
    ]
    if tally.first_failure:
        lines_out.append(f"  first problem: {tally.first_failure}")
    if rejected.count and rejected.path is not None:
        lines_out.append(f"  {rejected.count:,} events not stored are in {rejected.path}")
    elif rejected.count:
        lines_out.append("  (--rejected FILE keeps the events not stored, to fix and send again)")
    out.write("\n".join(lines_out) + "\n")
    out.flush()
