"""Router benchmarks: throughput, end-to-end latency, and tenant isolation under a flood.

    .venv/bin/python bench/router.py --smoke      # every mode, tiny sizes, about a minute
    .venv/bin/python bench/router.py throughput [--jobs 200000] [--kind grpc|webhook] [--batch N]
                                                [--destinations 50] [--tenants 1]
                                                [--start paused|running]
                                                [--workers 1] [--service-cpus 0,1]
    .venv/bin/python bench/router.py scaling [--jobs 200000] [--rounds 3]
    .venv/bin/python bench/router.py idle [--destinations 10000] [--tenants 100]
    .venv/bin/python bench/router.py history [--rounds 12] [--jobs 100000] [--keep]
    .venv/bin/python bench/router.py latency [--rate 1000] [--seconds 20]
    .venv/bin/python bench/router.py fairness [--seconds 15]

throughput: jobs for 10,000 users and 50 destinations are written straight into a fresh
database, then one relayq-router delivers them (ordering on, as always) to a sink process that
answers at once. Jobs/s is measured at the sink, from the first arrival to the last. The
destinations are paused until the router is up and then resumed (`--start paused`: every
destination catches up on its own), or the router starts on the backlog (`--start running`:
destinations follow the shared read of the log, as after a restart).

scaling: throughput with one router worker on one core, one on two, two on two, in turn.

history: rounds of jobs through one router, finished partitions dropped between rounds (or
kept): throughput and database size per round.

idle: what one router and its Postgres backends cost with many destinations and no traffic.

latency: relayq-ingest, relayq-router and a webhook sink; a client sends events at a steady
rate (batches of 10) and notes when each batch was acknowledged; the sink notes when each
event arrived. Reported: p50/p99 of arrival minus ack (and minus send).

fairness: tenant B sends 100 events/s to its webhook and its p50/p99 (ack to arrival) are
measured alone, then again while tenant A floods its own webhook with as many events as ingest
takes, on top of a 100,000-job backlog. B's time is also split where it is spent: send -> ack
(ingest: validation and the group commit), ack -> dispatch (queued in relayq until the router
starts the delivery: the attempt's started_at, from the router's clock on this machine), and
dispatch -> sink.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.router_backlog import SCALING, history, idle, scaling, throughput
from bench.router_live import fairness, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every mode at a tiny size (about a minute): for CI, so the"
                             " benchmark cannot rot unnoticed")
    commands = parser.add_subparsers(dest="command")
    t = commands.add_parser("throughput")
    t.add_argument("--jobs", type=int, default=200_000)
    t.add_argument("--kind", choices=("grpc", "webhook"), default="grpc")
    t.add_argument("--destinations", type=int, default=50)
    t.add_argument("--tenants", type=int, default=1)
    t.add_argument("--batch", type=int, default=1,
                   help="webhooks: events per request (the destinations' batch_max_events)")
    t.add_argument("--start", choices=("paused", "running"), default="paused",
                   help="paused: destinations resumed once the router is up (each catches up"
                        " on its own); running: the router starts on the backlog")
    t.add_argument("--workers", default="1",
                   help="RELAYQ_ROUTER_WORKERS (default 1; 'auto': one per CPU it may use)")
    t.add_argument("--service-cpus", metavar="LIST",
                   help="run the router under `taskset -c LIST` (e.g. 0 or 0,1); the sink and"
                        " Postgres still run anywhere")
    sc = commands.add_parser("scaling", help="throughput (gRPC, 50 destinations) of 1 worker on"
                             " CPU 0, 1 worker on CPUs 0,1, 2 workers on CPUs 0,1, in turn")
    sc.add_argument("--jobs", type=int, default=200_000)
    sc.add_argument("--rounds", type=int, default=3)
    h = commands.add_parser("history")
    h.add_argument("--rounds", type=int, default=12)
    h.add_argument("--jobs", type=int, default=100_000)
    h.add_argument("--keep", action="store_true",
                   help="maintenance off: finished partitions and dedupe keys stay")
    i = commands.add_parser("idle")
    i.add_argument("--destinations", type=int, default=10_000)
    i.add_argument("--tenants", type=int, default=100)
    i.add_argument("--seconds", type=float, default=30)
    lat = commands.add_parser("latency")
    lat.add_argument("--rate", type=float, default=1000)
    lat.add_argument("--seconds", type=float, default=20)
    f = commands.add_parser("fairness")
    f.add_argument("--seconds", type=float, default=15)
    f.add_argument("--flood-rate", type=float, default=10_000,
                   help="tenant A's events/s (default 100x tenant B's 100/s); 0: as fast as"
                        " ingest takes them")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.smoke:
        throughput(2_000, "grpc", 5, 1)
        throughput(2_000, "grpc", 5, 1, start="running")
        throughput(1_000, "webhook", 5, 1)
        throughput(1_000, "webhook", 5, 1, batch=10)
        scaling(2_000, 1, SCALING[-1:])
        idle(200, 10, 3)
        history(2, 2_000, False)
        latency(200, 3)
        fairness(3, 1_000)
    elif args.command is None:
        parser.error("a mode (throughput, scaling, history, idle, latency, fairness) or --smoke")
    elif args.command == "throughput":
        throughput(args.jobs, args.kind, args.destinations, args.tenants, args.workers,
                   args.service_cpus, args.batch, args.start)
    elif args.command == "scaling":
        scaling(args.jobs, args.rounds)
    elif args.command == "history":
        history(args.rounds, args.jobs, args.keep)
    elif args.command == "idle":
        idle(args.destinations, args.tenants, args.seconds)
    elif args.command == "latency":
        latency(args.rate, args.seconds)
    else:
        fairness(args.seconds, args.flood_rate)


if __name__ == "__main__":
    main()
