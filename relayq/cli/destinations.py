"""relayq destinations create|list|get|update|pause|resume|rotate-secret."""

from __future__ import annotations

import argparse
import sys

from relayq import destination_types
from relayq.cli import render, units
from relayq.cli.client import Admin, admin_command, options
from relayq.v1 import admin_pb2, common_pb2


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = options()
    destinations = commands.add_parser("destinations",
                                       help="create, change, pause and resume destinations")
    sub = destinations.add_subparsers(dest="destinations_command", required=True,
                                      metavar="command")

    cmd = sub.add_parser("create", parents=[common],
                         help=f"create a destination ({', '.join(destination_types.TYPES)})")
    cmd.add_argument("--tenant", required=True, help="the tenant that owns it")
    cmd.add_argument("--type", required=True, choices=tuple(destination_types.TYPES),
                     dest="kind")
    cmd.add_argument("--endpoint", required=True,
                     help="; ".join(f"{t.name}: {t.endpoint_help}"
                                    for t in destination_types.TYPES.values()))
    cmd.add_argument("--id", default="", dest="destination_id",
                     help="default: one is generated")
    cmd.add_argument("--paused", action="store_true", help="hold its jobs until resumed")
    _settings(cmd)
    cmd.set_defaults(run=admin_command(create))

    cmd = sub.add_parser("list", parents=[common], help="destinations the token can see")
    cmd.add_argument("--tenant", default="", help="only this tenant's")
    cmd.set_defaults(run=admin_command(list_destinations))

    cmd = sub.add_parser("get", parents=[common], help="one destination and its settings")
    cmd.add_argument("destination_id", metavar="ID")
    cmd.set_defaults(run=admin_command(get))

    cmd = sub.add_parser("update", parents=[common],
                         help="change the settings given; leave the rest as they are")
    cmd.add_argument("destination_id", metavar="ID")
    cmd.add_argument("--endpoint")
    cmd.add_argument("--replace-headers", action="store_true",
                     help="the --header options replace every header (default: add or change)")
    _settings(cmd)
    cmd.set_defaults(run=admin_command(update))

    cmd = sub.add_parser("rotate-secret", parents=[common],
                         help="a new signing secret for a webhook; the old one signs too"
                              " until --grace ends")
    cmd.add_argument("destination_id", metavar="ID")
    cmd.add_argument("--grace", type=units.seconds, default=None, metavar="DURATION",
                     help="how long the old secret keeps signing beside the new one, e.g. 2h"
                          " (default 24h; 0: stops at once, for a leaked secret)")
    cmd.set_defaults(run=admin_command(rotate_secret))

    for name, run, what in (("pause", pause, "hold the destination's jobs"),
                            ("resume", resume, "deliver its held jobs again, in order")):
        cmd = sub.add_parser(name, parents=[common], help=what)
        cmd.add_argument("destination_id", metavar="ID")
        cmd.set_defaults(run=admin_command(run))

    cmd = sub.add_parser("circuit", parents=[common],
                         help="open a destination's circuit (only probe it) or close it")
    cmd.add_argument("destination_id", metavar="ID")
    cmd.add_argument("state", choices=("open", "close"))
    cmd.add_argument("--reason", default="", help="why (required to open)")
    cmd.set_defaults(run=admin_command(circuit))


def _settings(cmd: argparse.ArgumentParser) -> None:
    """Options create and update share; None means 'not given' (server default, or unchanged)."""
    cmd.add_argument("--name", help="a display name")
    cmd.add_argument("--min-backoff", type=units.milliseconds, metavar="DURATION",
                     help="first retry delay, doubling per failure (default 1s)")
    cmd.add_argument("--max-backoff", type=units.milliseconds, metavar="DURATION",
                     help="longest retry delay (default 5m)")
    cmd.add_argument("--max-attempts", type=int, metavar="N",
                     help="abort after this many attempts AND --retry-window (default 10)")
    cmd.add_argument("--retry-window", type=units.seconds, metavar="DURATION",
                     help="abort only once the first attempt is this old (default 3h)")
    cmd.add_argument("--rate", type=float, metavar="PER_SECOND",
                     help="deliveries per second, 0 for unlimited (default unlimited)")
    cmd.add_argument("--burst", type=int, metavar="N", help="token-bucket size for --rate")
    cmd.add_argument("--concurrency", type=int, metavar="N",
                     help="deliveries in flight at once (default 64)")
    cmd.add_argument("--timeout", type=units.milliseconds, metavar="DURATION",
                     help="per-delivery timeout (default 30s)")
    cmd.add_argument("--header", action="append", default=[], metavar="NAME:VALUE",
                     type=parse_header,
                     help="an HTTP header for webhooks, call metadata for grpc (repeatable)")
    cmd.add_argument("--circuit-after", type=units.seconds, metavar="DURATION",
                     help="open the circuit after every attempt failed this long, 0 never"
                          " (default 10m)")
    cmd.add_argument("--circuit-min-failures", type=int, metavar="N",
                     help="... and at least this many attempts (default 20)")
    cmd.add_argument("--circuit-probe", type=units.seconds, metavar="DURATION",
                     help="while open, one probe delivery this often (default 30s)")
    cmd.add_argument("--batch-max-events", type=int, metavar="N",
                     help="webhooks: up to N events a request, as a JSON array (default 1: one"
                          " event a request, as an object)")
    cmd.add_argument("--batch-max-bytes", type=int, metavar="BYTES",
                     help="webhooks: bytes of events a request at most (default 1048576)")
    cmd.add_argument("--batch-linger", type=units.milliseconds, metavar="DURATION",
                     help="webhooks: wait up to this for a fuller batch (default 0)")


def create(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.CreateDestinationRequest(
        id=args.destination_id, tenant_id=args.tenant, name=args.name or "", type=args.kind,
        endpoint=args.endpoint, concurrency=args.concurrency or 0, timeout_ms=args.timeout or 0,
        paused=args.paused, headers=dict(args.header))
    if _retry_given(args):
        request.retry_policy.CopyFrom(_retry_policy(common_pb2.RetryPolicy(), args))
    if _rate_given(args):
        request.rate_limit.CopyFrom(rate_limit(common_pb2.RateLimit(), args))
    if _circuit_given(args):
        request.circuit_policy.CopyFrom(_circuit_policy(admin_pb2.CircuitPolicy(), args))
    if _batch_given(args):
        request.batch_policy.CopyFrom(_batch_policy(admin_pb2.BatchPolicy(), args))
    return show(admin.call(admin.stub.CreateDestination, request), args)


def update(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.UpdateDestinationRequest(
        id=args.destination_id, headers=dict(args.header), replace_headers=args.replace_headers)
    for field, value in (("name", args.name), ("endpoint", args.endpoint),
                         ("concurrency", args.concurrency), ("timeout_ms", args.timeout)):
        if value is not None:
            setattr(request, field, value)
    if _retry_given(args) or _rate_given(args) or _circuit_given(args) or _batch_given(args):
        # The policies and the limit travel whole; start from the current ones so that
        # `--max-attempts 5` changes only that and keeps the backoffs.
        current = admin.call(admin.stub.GetDestination,
                             admin_pb2.GetDestinationRequest(id=args.destination_id))
        if _retry_given(args):
            request.retry_policy.CopyFrom(_retry_policy(current.retry_policy, args))
        if _rate_given(args):
            request.rate_limit.CopyFrom(rate_limit(current.rate_limit, args))
        if _circuit_given(args):
            request.circuit_policy.CopyFrom(_circuit_policy(current.circuit_policy, args))
        if _batch_given(args):
            request.batch_policy.CopyFrom(_batch_policy(current.batch_policy, args))
    return show(admin.call(admin.stub.UpdateDestination, request), args)


def pause(admin: Admin, args: argparse.Namespace) -> int:
    return show(admin.call(admin.stub.UpdateDestination, admin_pb2.UpdateDestinationRequest(
        id=args.destination_id, paused=True)), args)


def resume(admin: Admin, args: argparse.Namespace) -> int:
    return show(admin.call(admin.stub.UpdateDestination, admin_pb2.UpdateDestinationRequest(
        id=args.destination_id, paused=False)), args)


def circuit(admin: Admin, args: argparse.Namespace) -> int:
    return show(admin.call(admin.stub.SetCircuit, admin_pb2.SetCircuitRequest(
        destination_id=args.destination_id, open=args.state == "open", reason=args.reason)),
        args)


def rotate_secret(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.RotateSigningSecretRequest(destination_id=args.destination_id)
    if args.grace is not None:
        request.grace_seconds = args.grace
    answer = admin.call(admin.stub.RotateSigningSecret, request)
    if args.json:
        render.print_json(answer)
        return 0
    render.fields([("id", answer.destination.id), ("signing secret", answer.signing_secret),
                   ("old secret signs until", render.when(answer.previous_expire_at))])
    _secret_note()
    return 0


def get(admin: Admin, args: argparse.Namespace) -> int:
    return show(admin.call(admin.stub.GetDestination,
                           admin_pb2.GetDestinationRequest(id=args.destination_id)), args)


def list_destinations(admin: Admin, args: argparse.Namespace) -> int:
    request = admin_pb2.ListDestinationsRequest(tenant_id=args.tenant)
    answer = admin.call(admin.stub.ListDestinations, request)
    while answer.next_page_token:
        request.page_token = answer.next_page_token
        page = admin.call(admin.stub.ListDestinations, request)
        answer.destinations.extend(page.destinations)
        answer.next_page_token = page.next_page_token
    if args.json:
        render.print_json(answer)
    elif not answer.destinations:
        print("no destinations", file=sys.stderr)
    else:
        render.table(
            ["ID", "TENANT", "NAME", "TYPE", "ENDPOINT", "PAUSED", "CIRCUIT", "CONCURRENCY",
             "RATE", "CREATED"],
            [[d.id, d.tenant_id, d.name or render.EMPTY, d.type, d.endpoint,
              render.yes_no(d.paused), _circuit_state(d.circuit), str(d.concurrency),
              render.rate(d.rate_limit), render.ago(d.created_at)]
             for d in answer.destinations])
    return 0


def show(destination: admin_pb2.DestinationConfig, args: argparse.Namespace) -> int:
    if args.json:
        render.print_json(destination)
        return 0
    secret = [("signing secret", destination.signing_secret)] if destination.signing_secret else []
    policy = destination.retry_policy
    render.fields([
        ("id", destination.id),
        ("tenant", destination.tenant_id),
        ("name", destination.name or render.EMPTY),
        ("type", destination.type),
        ("endpoint", destination.endpoint),
        ("paused", render.yes_no(destination.paused)),
        ("concurrency", str(destination.concurrency)),
        ("timeout", render.millis(destination.timeout_ms)),
        ("rate limit", render.rate(destination.rate_limit)),
        ("backoff", f"{render.millis(policy.min_backoff_ms)} to"
                    f" {render.millis(policy.max_backoff_ms)}"),
        ("gives up after", f"{policy.max_attempts} attempts and"
                           f" {render.span(policy.max_retry_window_seconds)}"),
        ("circuit", _circuit_state(destination.circuit)
         + (f" since {render.when(destination.circuit.opened_at)}:"
            f" {destination.circuit.reason}" if destination.circuit.open else "")),
        ("circuit policy", _circuit_policy_text(destination.circuit_policy)),
        *([("batches", _batch_policy_text(destination.batch_policy))]
          if _takes_batches(destination.type) else []),
        ("headers", render.header_names(destination.headers)),
        ("created", render.when(destination.created_at)),
        ("updated", render.when(destination.updated_at)),
        *secret,
    ])
    if secret:
        _secret_note()
    return 0


def _takes_batches(type_name: str) -> bool:
    """Does this type take a batch policy (the type registry says; an unknown type, from a
    newer server, shows none)?"""
    known = destination_types.TYPES.get(type_name)
    return known is not None and known.batches


def _secret_note() -> None:
    print("the signing secret is shown only now; the receiver verifies each request's"
          " webhook-signature with it (Standard Webhooks)", file=sys.stderr)


def _retry_given(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.min_backoff, args.max_backoff, args.max_attempts,
                                       args.retry_window))


def _circuit_given(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.circuit_after, args.circuit_min_failures,
                                       args.circuit_probe))


def _circuit_policy(base: admin_pb2.CircuitPolicy, args: argparse.Namespace
                    ) -> admin_pb2.CircuitPolicy:
    policy = admin_pb2.CircuitPolicy()
    policy.CopyFrom(base)
    if args.circuit_after is not None:
        policy.open_after_seconds = args.circuit_after
        policy.disabled = args.circuit_after == 0
    if args.circuit_min_failures is not None:
        policy.min_failures = args.circuit_min_failures
    if args.circuit_probe is not None:
        policy.probe_every_seconds = args.circuit_probe
    return policy


def _batch_given(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.batch_max_events, args.batch_max_bytes,
                                       args.batch_linger))


def _batch_policy(base: admin_pb2.BatchPolicy, args: argparse.Namespace
                  ) -> admin_pb2.BatchPolicy:
    policy = admin_pb2.BatchPolicy()
    policy.CopyFrom(base)
    for field, value in (("max_events", args.batch_max_events),
                         ("max_bytes", args.batch_max_bytes), ("linger_ms", args.batch_linger)):
        if value is not None:
            setattr(policy, field, value)
    return policy


def _batch_policy_text(policy: admin_pb2.BatchPolicy) -> str:
    if policy.max_events <= 1:
        return "none: one event a request"
    text = f"up to {policy.max_events} events and {policy.max_bytes:,} bytes a request"
    return text + (f", waiting up to {render.millis(policy.linger_ms)} for more"
                   if policy.linger_ms else "")


def _circuit_state(circuit: admin_pb2.Circuit) -> str:
    return "open" if circuit.open else "closed"


def _circuit_policy_text(policy: admin_pb2.CircuitPolicy) -> str:
    if policy.disabled:
        return "never opens by itself"
    return (f"opens after {render.span(policy.open_after_seconds)} and"
            f" {policy.min_failures} attempts of failures; probes every"
            f" {render.span(policy.probe_every_seconds)}")


def _rate_given(args: argparse.Namespace) -> bool:
    return args.rate is not None or args.burst is not None


def _retry_policy(base: common_pb2.RetryPolicy, args: argparse.Namespace) -> common_pb2.RetryPolicy:
    policy = common_pb2.RetryPolicy()
    policy.CopyFrom(base)
    for field, value in (("min_backoff_ms", args.min_backoff), ("max_backoff_ms", args.max_backoff),
                         ("max_attempts", args.max_attempts),
                         ("max_retry_window_seconds", args.retry_window)):
        if value is not None:
            setattr(policy, field, value)
    return policy


def rate_limit(base: common_pb2.RateLimit, args: argparse.Namespace) -> common_pb2.RateLimit:
    """`base` with --rate and --burst applied, each only if given (sources use it too)."""
    limit = common_pb2.RateLimit()
    limit.CopyFrom(base)
    if args.rate is not None:
        limit.per_second = args.rate
    if args.burst is not None:
        limit.burst = args.burst
    return limit


def parse_header(text: str) -> tuple[str, str]:
    """'Name: value' or 'Name=value'; values may themselves hold ':' or '='."""
    cut = min((i for i in (text.find(":"), text.find("=")) if i > 0), default=-1)
    if cut < 0:
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return text[:cut].strip(), text[cut + 1:].strip()
