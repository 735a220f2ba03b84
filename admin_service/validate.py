"""Checking operators' requests before anything is written, with messages that name the field.

Every function raises relayq.rpc.InvalidArgument; nothing here touches the database.
"""

from __future__ import annotations

import math
import re
import secrets

from filterlang.errors import FilterError
from filterlang.events import compile_event_filter
from relayq import destination_types, netpolicy
from relayq.rpc import InvalidArgument
from relayq.v1 import admin_pb2, common_pb2

ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
# Control characters other than tab: CR and LF would inject headers, NUL cannot be stored.
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

MAX_NAME = 200
MAX_ENDPOINT = 2048
MAX_HEADERS = 50
MAX_HEADER_VALUE = 4096
MAX_REASON = 1000
MAX_PAGE = 1000
MAX_GRACE_SECONDS = 30 * 86_400

DEFAULT_RETRY = common_pb2.RetryPolicy(min_backoff_ms=1000, max_backoff_ms=300_000,
                                       max_attempts=10, max_retry_window_seconds=10_800)
DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT_MS = 30_000


def bad(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {problem}", violations=[(field, problem)])


def object_id(field: str, value: str) -> str:
    if not ID.match(value):
        raise bad(field, "must be 1 to 63 of lower-case letters, digits, '-' and '_', "
                         f"starting with a letter or digit; got {value!r}")
    return value


def reference(field: str, value: str) -> str:
    """An id naming something that should exist: required, and shaped like every id is (so a
    typo gets its own message, and text Postgres cannot hold never reaches it)."""
    if not value:
        raise bad(field, "required")
    return object_id(field, value)


def optional_reference(field: str, value: str) -> str | None:
    """A filter by id: absent, or a reference."""
    return reference(field, value) if value else None


def new_id(field: str, value: str, prefix: str) -> str:
    """The id asked for, or a generated one when empty."""
    return object_id(field, value) if value else f"{prefix}-{secrets.token_hex(5)}"


def name(field: str, value: str) -> str:
    if len(value) > MAX_NAME:
        raise bad(field, f"longer than {MAX_NAME} characters")
    if "\x00" in value:
        raise bad(field, "must not contain NUL characters (Postgres text cannot hold them)")
    return value


def reason(value: str) -> str:
    if len(value) > MAX_REASON:
        raise bad("reason", f"longer than {MAX_REASON} characters")
    if "\x00" in value:
        raise bad("reason", "must not contain NUL characters (Postgres text cannot hold them)")
    return value


def endpoint(field: str, kind: str, value: str, policy: netpolicy.NetworkPolicy) -> str:
    """A usable endpoint of the type, whose host, when it is written as an address (or is
    `localhost`), the network policy allows. A name is not resolved here: where it leads is
    checked by the router at every attempt, on the address it connects to."""
    if not value:
        raise bad(field, "required")
    if (len(value) > MAX_ENDPOINT or not value.isprintable()
            or any(c.isspace() for c in value)):
        raise bad(field, f"must be at most {MAX_ENDPOINT} characters without spaces or"
                         " control characters")
    destination_type = destination_types.TYPES[kind]
    try:
        destination_type.check_endpoint(value)
    except destination_types.Unusable as exc:
        raise bad(field, str(exc)) from None
    address = netpolicy.known_address(destination_type.host(value))
    if address is not None:
        try:
            policy.check(address)
        except netpolicy.Refused as refused:
            raise bad(field, netpolicy.explain(refused)) from None
    return value


def kind(value: str) -> str:
    if value not in destination_types.TYPES:
        raise bad("type", f"must be {destination_types.names()}; got {value!r}")
    return value


def retry_policy(field: str, policy: common_pb2.RetryPolicy) -> common_pb2.RetryPolicy:
    """The policy with zero fields taking their defaults, checked for sense."""
    merged = common_pb2.RetryPolicy(
        min_backoff_ms=policy.min_backoff_ms or DEFAULT_RETRY.min_backoff_ms,
        max_backoff_ms=policy.max_backoff_ms or max(DEFAULT_RETRY.max_backoff_ms,
                                                    policy.min_backoff_ms),
        max_attempts=policy.max_attempts or DEFAULT_RETRY.max_attempts,
        max_retry_window_seconds=policy.max_retry_window_seconds
        or DEFAULT_RETRY.max_retry_window_seconds,
    )
    if merged.min_backoff_ms > 86_400_000:
        raise bad(f"{field}.min_backoff_ms", "at most one day (86400000)")
    if merged.max_backoff_ms < merged.min_backoff_ms:
        raise bad(f"{field}.max_backoff_ms", "must be at least min_backoff_ms")
    if merged.max_backoff_ms > 86_400_000:
        raise bad(f"{field}.max_backoff_ms", "at most one day (86400000)")
    if merged.max_attempts > 1000:
        raise bad(f"{field}.max_attempts", "at most 1000")
    if merged.max_retry_window_seconds > 30 * 86_400:
        raise bad(f"{field}.max_retry_window_seconds", "at most 30 days (2592000)")
    return merged


DEFAULT_CIRCUIT = admin_pb2.CircuitPolicy(open_after_seconds=600, min_failures=20,
                                          probe_every_seconds=30)


def circuit_policy(field: str, policy: admin_pb2.CircuitPolicy) -> admin_pb2.CircuitPolicy:
    """The policy with zero fields taking their defaults; `disabled` stores open_after 0."""
    merged = admin_pb2.CircuitPolicy(
        open_after_seconds=0 if policy.disabled
        else policy.open_after_seconds or DEFAULT_CIRCUIT.open_after_seconds,
        min_failures=policy.min_failures or DEFAULT_CIRCUIT.min_failures,
        probe_every_seconds=policy.probe_every_seconds or DEFAULT_CIRCUIT.probe_every_seconds,
        disabled=policy.disabled,
    )
    if merged.open_after_seconds > 30 * 86_400:
        raise bad(f"{field}.open_after_seconds", "at most 30 days (2592000)")
    if merged.min_failures > 1_000_000:
        raise bad(f"{field}.min_failures", "at most 1000000")
    if merged.probe_every_seconds > 86_400:
        raise bad(f"{field}.probe_every_seconds", "at most one day (86400)")
    return merged


def batch_policy(field: str, kind: str, policy: admin_pb2.BatchPolicy
                 ) -> admin_pb2.BatchPolicy:
    """The policy with zero fields taking their defaults; only types that batch take one."""
    merged = admin_pb2.BatchPolicy(max_events=policy.max_events or 1,
                                   max_bytes=policy.max_bytes or 1_048_576,
                                   linger_ms=policy.linger_ms)
    batched = merged.max_events > 1 or merged.linger_ms
    if batched and not destination_types.TYPES[kind].batches:
        raise bad(field, f"a {kind} destination takes no batch policy (webhooks do; gRPC"
                         " destinations get batches of RELAYQ_ROUTER_GRPC_BATCH)")
    if merged.max_events > 10_000:
        raise bad(f"{field}.max_events", "at most 10000")
    if not 1024 <= merged.max_bytes <= 64 * 1024 * 1024:
        raise bad(f"{field}.max_bytes", "from 1024 to 67108864")
    if merged.linger_ms > 60_000:
        raise bad(f"{field}.linger_ms", "at most 60000 (a minute)")
    return merged


def circuit_reason(value: str) -> str:
    if not value.strip():
        raise bad("reason", "required when opening a circuit (it is shown to operators)")
    return reason(value)


def rate_limit(field: str, limit: common_pb2.RateLimit) -> common_pb2.RateLimit:
    if not math.isfinite(limit.per_second) or limit.per_second < 0:
        raise bad(f"{field}.per_second", "must be a finite number >= 0 (0: unlimited)")
    if limit.per_second > 1_000_000:
        raise bad(f"{field}.per_second", "at most 1000000")
    if limit.burst > 1_000_000:
        raise bad(f"{field}.burst", "at most 1000000")
    return limit


def concurrency(field: str, value: int) -> int:
    if value > 10_000:
        raise bad(field, "at most 10000")
    return value or DEFAULT_CONCURRENCY


def timeout_ms(field: str, value: int) -> int:
    if value > 600_000:
        raise bad(field, "at most 600000 (10 minutes)")
    return value or DEFAULT_TIMEOUT_MS


def headers(field: str, kind: str, values: dict[str, str]) -> dict[str, str]:
    """Webhooks send them as HTTP headers, gRPC destinations as call metadata (whose names
    are lower case: they are stored lowered, as the sink will see them); each type says."""
    if len(values) > MAX_HEADERS:
        raise bad(field, f"at most {MAX_HEADERS} headers")
    for key, value in values.items():
        if not HEADER_NAME.match(key):
            raise bad(field, f"invalid header name {key!r}")
        if len(value) > MAX_HEADER_VALUE or _HEADER_VALUE_FORBIDDEN.search(value):
            raise bad(field, f"invalid value for header {key!r}")
    try:
        return destination_types.TYPES[kind].normalise_headers(dict(values))
    except destination_types.Unusable as exc:
        raise bad(field, str(exc)) from None


def headers_update(field: str, kind: str, current: dict[str, str], given: dict[str, str], *,
                   replace: bool) -> dict[str, str]:
    """The headers after an update: `given` in place of all, or merged over `current`. A gRPC
    destination's stored names may predate lower-casing, so such types merge by lowered name."""
    given = headers(field, kind, given)
    if replace:
        return given
    if destination_types.TYPES[kind].lowercase_headers:
        current = {name.lower(): value for name, value in current.items()}
    return headers(field, kind, {**current, **given})


def event_filter(field: str, value: str) -> str:
    """A connection's filter, compiled here only to be checked (ingest compiles what is
    stored): a malformed one names the column and what was expected there, as job filters
    do. "" (or only spaces) means every event."""
    try:
        compiled = compile_event_filter(value)
    except FilterError as exc:
        raise bad(field, exc.message) from None
    return "" if compiled is None else value


def grace_seconds(field: str, value: int | None, *, default: int) -> int:
    """How long replaced credentials keep working (None: the default)."""
    if value is None:
        return default
    if value > MAX_GRACE_SECONDS:
        raise bad(field, f"at most 30 days ({MAX_GRACE_SECONDS})")
    return value


def page_size(field: str, value: int, default: int) -> int:
    if value > MAX_PAGE:
        raise bad(field, f"at most {MAX_PAGE}")
    return value or default


def job_ids(field: str, values: list[int]) -> list[int]:
    if len(values) > 10_000:
        raise bad(field, "at most 10000 ids; use a filter for more")
    if any(v <= 0 for v in values):
        raise bad(field, "job ids are positive")
    return sorted(set(values))


def selector(request_selector: admin_pb2.JobSelector) -> tuple[list[int], str]:
    ids = list(request_selector.job_ids)
    text = request_selector.filter
    if ids and text:
        raise bad("selector", "give job_ids or filter, not both")
    if not ids and not text.strip():
        raise bad("selector", "give job_ids or a filter (to select every job, say so: "
                              "filter \"job_id > 0\")")
    return job_ids("selector.job_ids", ids), text
