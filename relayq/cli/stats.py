"""relayq stats: counts per state, oldest pending age and recent rates."""

from __future__ import annotations

import argparse

from relayq.cli import render
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cmd = commands.add_parser(
        "stats", parents=[options()],
        help="jobs per state, oldest pending age and delivery rates, per destination and tenant")
    cmd.add_argument("--tenant", default="", help="only this tenant")
    cmd.add_argument("--destination", default="", help="only this destination")
    cmd.set_defaults(run=admin_command(stats))


def stats(admin: Admin, args: argparse.Namespace) -> int:
    answer = admin.call(admin.stub.GetStats, admin_pb2.GetStatsRequest(
        tenant_id=args.tenant, destination_id=args.destination))
    if args.json:
        render.print_json(answer)
        return 0
    counts = ["PENDING", "FAILED", "WAITING", "SUCCEEDED", "ABORTED"]
    render.table(
        ["DESTINATION", "TENANT", *counts, "OLDEST PENDING", "DELIVERED/S", "FAILED/S", "PAUSED"],
        [[d.destination_id, d.tenant_id, *_counts(d.counts), _age(d.oldest_pending_seconds),
          _rate(d.delivered_per_second), _rate(d.failed_per_second), render.yes_no(d.paused)]
         for d in answer.destinations],
    )
    print()
    render.table(
        ["TENANT", *counts, "OLDEST PENDING", "DELIVERED/S", "FAILED/S"],
        [[t.tenant_id, *_counts(t.counts), _age(t.oldest_pending_seconds),
          _rate(t.delivered_per_second), _rate(t.failed_per_second)]
         for t in answer.tenants],
    )
    if answer.HasField("event_log"):
        log = answer.event_log
        oldest = (f"oldest event {log.oldest_event_id}, {render.when(log.oldest_event_at)}"
                  if log.HasField("oldest_event_at") else "empty")
        print(f"\nevent log: {log.events} events, {_bytes(log.bytes)}; {oldest}")
    if answer.connections:
        print()
        render.table(
            ["SOURCE", "DESTINATION", "FILTERED OUT", "FILTERED/S", "FILTER"],
            [[c.source_id, c.destination_id, str(c.filtered_out),
              _rate(c.filtered_out_per_second), c.filter or render.EMPTY]
             for c in answer.connections],
        )
    return 0


def _counts(counts: admin_pb2.StateCounts) -> list[str]:
    return [str(n) for n in (counts.pending, counts.failed, counts.waiting, counts.succeeded,
                             counts.aborted)]


def _age(seconds: float) -> str:
    return render.span(seconds) if seconds > 0 else render.EMPTY


def _rate(per_second: float) -> str:
    return f"{per_second:.1f}"


def _bytes(count: int) -> str:
    """1536 -> '1.5 kB' (powers of 1024)."""
    size, unit = float(count), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
