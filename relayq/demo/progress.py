"""The live view `relayq up` shows: events sent, and per destination what became of them.

The numbers come from the admin API's GetStats (what any operator tool would see), the demo
traffic's own counters and the demo sink's order check. On a terminal the table is redrawn
in place every second; otherwise (a pipe, a log file, CI) one line is written per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
import grpc

from relayq import terminal
from relayq.v1 import admin_pb2, admin_pb2_grpc


@dataclass
class Snapshot:
    elapsed: float
    sent: Mapping[str, int]
    destinations: list[admin_pb2.DestinationStats] = field(default_factory=list)
    sink: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    error: str = ""


COLUMNS = ("destination", "pending", "retrying", "waiting", "delivered", "aborted", "per sec")


def table(snap: Snapshot) -> list[str]:
    """The view as lines, for a terminal."""
    sent = snap.sent
    out_of_order = sum(v.get("out_of_order", 0) for v in snap.sink.values())
    head = (f"relayq up · {_duration(snap.elapsed)} · events sent {sent.get('accepted', 0):,}"
            f" (duplicates {sent.get('duplicates', 0):,}, errors {sent.get('errors', 0):,})"
            f" · out of order at the sink: {out_of_order}")
    rows = [COLUMNS] + [
        (d.destination_id, f"{d.counts.pending:,}", f"{d.counts.failed:,}",
         f"{d.counts.waiting:,}", f"{d.counts.succeeded:,}", f"{d.counts.aborted:,}",
         f"{d.delivered_per_second:.1f}" + (" (paused)" if d.paused else ""))
        for d in snap.destinations
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [head, ""]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        lines.append("  ".join(cells))
    if snap.error:
        lines.append(f"(stats unavailable: {snap.error})")
    lines.append("")
    lines.append("retrying: failed, retried after a backoff; waiting: held behind an earlier"
                 " failed event of the same user. Ctrl-C stops everything.")
    return lines


def line(snap: Snapshot) -> str:
    """The view as one line, for logs and pipes."""
    parts = [f"t={snap.elapsed:.0f}s", f"sent={snap.sent.get('accepted', 0)}"]
    for d in snap.destinations:
        c = d.counts
        parts.append(f"{d.destination_id}: pending={c.pending} retrying={c.failed}"
                     f" waiting={c.waiting} delivered={c.succeeded} aborted={c.aborted}")
    out_of_order = sum(v.get("out_of_order", 0) for v in snap.sink.values())
    parts.append(f"out_of_order={out_of_order}")
    if snap.error:
        parts.append(f"stats_error={snap.error!r}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(self, stub: admin_pb2_grpc.AdminAsyncStub, token: str,
                 sent: Callable[[], Mapping[str, int]], sink_stats_url: str | None,
                 out: TextIO = sys.stdout, interval: float = 1.0, tty: bool | None = None
                 ) -> None:
        self._stub = stub
        self._auth = (("authorization", f"Bearer {token}"),)
        self._sent = sent
        self._sink_url = sink_stats_url
        self._out = out
        self._interval = interval
        self._tty = out.isatty() if tty is None else tty
        self._drawn = 0
        self._started = time.monotonic()

    async def snapshot(self, http: aiohttp.ClientSession | None) -> Snapshot:
        snap = Snapshot(time.monotonic() - self._started, dict(self._sent()))
        try:
            stats = await self._stub.GetStats(admin_pb2.GetStatsRequest(),
                                              metadata=self._auth, timeout=5)
            snap.destinations = sorted(stats.destinations, key=lambda d: d.destination_id)
        except grpc.aio.AioRpcError as exc:
            snap.error = f"{exc.code().name}: {exc.details()}"
        if http is not None and self._sink_url:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with http.get(self._sink_url) as resp:
                    sink: Any = await resp.json()
                    snap.sink = sink
        return snap

    def interrupted(self) -> None:
        """Something else was written below the view: draw the next one afresh beneath it."""
        self._drawn = 0

    def draw(self, snap: Snapshot) -> None:
        if self._tty:
            lines = table(snap)
            # Back to the top of the previous drawing, and clear to the end of the screen.
            back = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            terminal.write(back + "\n".join(lines) + "\n", self._out)
            self._drawn = len(lines)
        else:
            terminal.write(line(snap) + "\n", self._out)

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                self.draw(await self.snapshot(http))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._interval)
            # One last picture, so what the user sees when it stops is current.
            self.draw(await self.snapshot(http))
