"""The catalog: tenants, sources and their write keys, destinations, connections and admin
tokens, as operators manage them (the admin service's data layer).

Every function takes `scope`: None for the operator, or the tenant_key a tenant-scoped token
belongs to. Rows outside the scope are reported as missing (errors.NotFound), so a tenant can
neither see nor change another tenant's objects, nor learn that they exist. Writes go through
the tables' triggers, which NOTIFY relayq_config: running ingest and router processes reload
within moments, without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from psycopg import AsyncConnection, sql
from psycopg.rows import class_row, kwargs_row
from psycopg.types.json import Jsonb

from jobsdb import sealing
from jobsdb.errors import NotFound
from jobsdb.keys import hash_secret, new_secret, new_signing_secret
from jobsdb.sqlfile import query

WRITE_KEY_PREFIX = "rq_wk_"
ADMIN_TOKEN_PREFIX = "rq_at_"


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_key: int
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Source:
    source_key: int
    id: str
    tenant_key: int
    tenant_id: str
    name: str
    enabled: bool
    created_at: datetime
    # Events per second ingest takes from this source (0: unlimited), and the burst.
    rate_per_second: float
    rate_burst: int


@dataclass(frozen=True, slots=True)
class SigningSecret:
    """A webhook signing secret in force (router_service.signing). Never in a repr or a log."""

    secret: str = field(repr=False)
    # None: until the next rotation. Set: a rotation's grace period ends then.
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Destination:
    destination_key: int
    id: str
    tenant_key: int
    tenant_id: str
    name: str
    type: str
    endpoint: str
    headers: dict[str, str]
    min_backoff_ms: int
    max_backoff_ms: int
    max_attempts: int
    max_retry_window_s: int
    rate_per_second: float
    rate_burst: int
    concurrency: int
    timeout_ms: int
    paused: bool
    created_at: datetime
    updated_at: datetime
    # The circuit breaker (migrations/0010_circuit_breaker.sql): its policy, and when and why
    # it opened (None: closed).
    circuit_after_s: int
    circuit_min_failures: int
    circuit_probe_s: int
    circuit_opened_at: datetime | None
    circuit_reason: str | None
    # Webhooks in batches (migrations/0011_webhook_batches.sql): at most this many events and
    # bytes a request, waiting up to the linger for a fuller one. 1 event: no batching.
    batch_max_events: int
    batch_max_bytes: int
    batch_linger_ms: int
    # Filled only by the router's load (jobsdb.destinations.load_all): the admin service's
    # reads never fetch secrets, so nothing it answers can show them.
    signing_secrets: tuple[SigningSecret, ...] = field(default=(), repr=False)
    # Why its sealed secrets, headers or endpoint could not be opened (the router's load: a
    # key it was not given); None when they could. Such a destination is never delivered to.
    unreadable: str | None = None


@dataclass(frozen=True, slots=True)
class DestinationSettings:
    """What an operator chooses for a destination; the columns' defaults live in the schema
    too, but the service fills every field so that the values it validated are the ones used."""

    name: str
    type: str
    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    min_backoff_ms: int = 1000
    max_backoff_ms: int = 300_000
    max_attempts: int = 10
    max_retry_window_s: int = 10_800
    rate_per_second: float = 0.0
    rate_burst: int = 0
    concurrency: int = 64
    timeout_ms: int = 30_000
    paused: bool = False
    circuit_after_s: int = 600
    circuit_min_failures: int = 20
    circuit_probe_s: int = 30
    batch_max_events: int = 1
    batch_max_bytes: int = 1_048_576
    batch_linger_ms: int = 0


# The columns UpdateDestination may change (a whitelist: the SQL is built from these names).
UPDATABLE = frozenset({
    "name", "endpoint", "headers", "min_backoff_ms", "max_backoff_ms", "max_attempts",
    "max_retry_window_s", "rate_per_second", "rate_burst", "concurrency", "timeout_ms", "paused",
    "circuit_after_s", "circuit_min_failures", "circuit_probe_s",
    "batch_max_events", "batch_max_bytes", "batch_linger_ms",
})


@dataclass(frozen=True, slots=True)
class Connection:
    source_id: str
    destination_id: str
    enabled: bool
    created_at: datetime
    # The event filter ("": every event).
    filter: str
    # Its number within the source: the low 16 bits of its jobs' ids.
    slot: int


@dataclass(frozen=True, slots=True)
class AdminToken:
    id: str
    tenant_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenOwner:
    token_id: str
    tenant_key: int
    tenant_id: str


Conn = AsyncConnection[Any]
Row = TypeVar("Row")


async def _one(conn: Conn, row: type[Row], name: str, params: dict[str, Any], what: str) -> Row:
    """The one row a named query returns, as `row` (columns matched to fields by name)."""
    cur = conn.cursor(row_factory=class_row(row))
    await cur.execute(query("catalog.sql", name), params)
    found = await cur.fetchone()
    if found is None:
        raise NotFound(f"{what} not found")
    return found


async def _all(conn: Conn, row: type[Row], name: str, params: dict[str, Any]) -> list[Row]:
    cur = conn.cursor(row_factory=class_row(row))
    await cur.execute(query("catalog.sql", name), params)
    return await cur.fetchall()


async def _key(conn: Conn, name: str, params: dict[str, Any], what: str) -> int:
    """The key a write returns (the row is then read back through its view)."""
    cur = await conn.execute(query("catalog.sql", name), params)
    found = await cur.fetchone()
    if found is None:
        raise NotFound(f"{what} not found")
    return int(found[0])


# --- tenants -------------------------------------------------------------------------------


async def create_tenant(conn: Conn, tenant_id: str, name: str) -> Tenant:
    return await _one(conn, Tenant, "create_tenant", {"id": tenant_id, "name": name}, "tenant")


async def get_tenant(conn: Conn, tenant_id: str, scope: int | None) -> Tenant:
    return await _one(conn, Tenant, "get_tenant", {"id": tenant_id, "scope": scope},
                      f"tenant {tenant_id!r}")


async def list_tenants(conn: Conn, scope: int | None, after: str, limit: int) -> list[Tenant]:
    return await _all(conn, Tenant, "list_tenants",
                      {"scope": scope, "after": after, "limit": limit})


# --- sources and write keys ----------------------------------------------------------------


async def create_source(conn: Conn, tenant: Tenant, source_id: str, name: str, *,
                        rate_per_second: float = 0.0, rate_burst: int = 0
                        ) -> tuple[Source, str]:
    """The new source and its write key (returned only here: we keep its hash)."""
    source_key = await _key(conn, "create_source", {
        "id": source_id, "tenant_key": tenant.tenant_key, "name": name,
        "rate_per_second": rate_per_second, "rate_burst": rate_burst,
    }, "source")
    return await get_source(conn, source_id, None), await _add_write_key(conn, source_key)


async def get_source(conn: Conn, source_id: str, scope: int | None) -> Source:
    return await _one(conn, Source, "get_source", {"id": source_id, "scope": scope},
                      f"source {source_id!r}")


async def list_sources(conn: Conn, scope: int | None, tenant_id: str | None, after: str,
                       limit: int) -> list[Source]:
    return await _all(conn, Source, "list_sources", {
        "scope": scope, "tenant_id": tenant_id, "after": after, "limit": limit})


async def update_source(conn: Conn, source: Source, *, name: str | None = None,
                        enabled: bool | None = None, rate_per_second: float | None = None,
                        rate_burst: int | None = None) -> Source:
    """Change what is given (None: keep). Running ingest processes see it within moments
    (the sources trigger notifies relayq_config, which clears their route caches)."""
    await _key(conn, "update_source", {
        "source_key": source.source_key, "name": name, "enabled": enabled,
        "rate_per_second": rate_per_second, "rate_burst": rate_burst,
    }, f"source {source.id!r}")
    return await get_source(conn, source.id, None)


async def rotate_write_key(conn: Conn, source: Source, grace_seconds: int) -> str:
    """A new key for the source; its current keys stop working after the grace period."""
    await conn.execute(query("catalog.sql", "expire_write_keys"),
                       {"source_key": source.source_key, "grace_seconds": grace_seconds})
    return await _add_write_key(conn, source.source_key)


async def _add_write_key(conn: Conn, source_key: int) -> str:
    write_key = new_secret(WRITE_KEY_PREFIX)
    await conn.execute(query("catalog.sql", "add_write_key"),
                       {"key_hash": hash_secret(write_key), "source_key": source_key})
    return write_key


# --- destinations --------------------------------------------------------------------------


def _sealed_columns(changes: dict[str, Any]) -> dict[str, Any]:
    """Destination columns as stored: headers sealed (the clear column left '{}'), and an
    endpoint with credentials stored without them and sealed whole (jobsdb.sealing)."""
    stored = dict(changes)
    keyring = sealing.installed()
    if "headers" in stored:
        stored["sealed_headers"] = keyring.seal_headers(stored["headers"])
        stored["headers"] = Jsonb({})
    if "endpoint" in stored:
        stored["endpoint"], stored["sealed_endpoint"] = keyring.seal_endpoint(
            stored["endpoint"])
    return stored


def _destination_row(cursor: Any) -> Any:
    """Rows of destination_rows as Destinations, their sealed columns opened."""
    keyring = sealing.installed()

    def make(**columns: Any) -> Destination:
        sealing.open_row(keyring, columns)
        return Destination(**columns)

    return kwargs_row(make)(cursor)


async def create_destination(conn: Conn, tenant: Tenant, destination_id: str,
                             settings: DestinationSettings) -> Destination:
    params: dict[str, Any] = _sealed_columns({
        name: getattr(settings, name) for name in DestinationSettings.__dataclass_fields__})
    params.update(id=destination_id, tenant_key=tenant.tenant_key)
    await _key(conn, "create_destination", params, "destination")
    return await get_destination(conn, destination_id, tenant.tenant_key)


async def get_destination(conn: Conn, destination_id: str, scope: int | None) -> Destination:
    cur = conn.cursor(row_factory=_destination_row)
    await cur.execute(query("catalog.sql", "get_destination"),
                      {"id": destination_id, "scope": scope})
    found: Destination | None = await cur.fetchone()
    if found is None:
        raise NotFound(f"destination {destination_id!r} not found")
    return found


async def list_destinations(conn: Conn, scope: int | None, tenant_id: str | None, after: str,
                            limit: int) -> list[Destination]:
    cur = conn.cursor(row_factory=_destination_row)
    await cur.execute(query("catalog.sql", "list_destinations"), {
        "scope": scope, "tenant_id": tenant_id, "after": after, "limit": limit})
    found: list[Destination] = await cur.fetchall()
    return found


async def update_destination(conn: Conn, destination: Destination, changes: dict[str, Any]
                             ) -> Destination:
    """Set the given columns (names from UPDATABLE only) and return the row as it now is."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    if changes:
        values = _sealed_columns(changes)
        statement = sql.SQL(
            "UPDATE destinations SET {}, updated_at = now() WHERE destination_key = {}"
        ).format(
            sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(name), sql.Placeholder(name))
                for name in sorted(values)),
            sql.Placeholder("destination_key"),
        )
        await conn.execute(statement, {**values, "destination_key": destination.destination_key})
    return await get_destination(conn, destination.id, destination.tenant_key)


async def set_circuit(conn: Conn, destination: Destination, *, open_: bool, reason: str
                      ) -> bool:
    """Open (with its reason) or close a destination's circuit; False if it already was.
    Routers open and close it as they see failures and probes; operators by hand."""
    cur = await conn.execute(query("catalog.sql", "open_circuit" if open_ else "close_circuit"),
                             {"destination_key": destination.destination_key, "reason": reason})
    return cur.rowcount > 0


async def add_signing_secret(conn: Conn, destination: Destination) -> str:
    """A new signing secret for the destination, in force at once; returned only here (the
    caller shows it once). The caller decides which destinations sign."""
    secret = new_signing_secret()
    sealed = sealing.installed().seal_text(secret, sealing.SIGNING_SECRET)
    await conn.execute(query("catalog.sql", "add_signing_secret"),
                       {"destination_key": destination.destination_key, "sealed": sealed})
    return secret


async def rotate_signing_secret(conn: Conn, destination: Destination, grace_seconds: int
                                ) -> tuple[str, datetime | None]:
    """A new secret for the destination; the ones in force keep signing for `grace_seconds`
    more (0: they stop at once). Returns the new secret and when the last of the old ones
    stops signing (None when there were none)."""
    params = {"destination_key": destination.destination_key, "grace_seconds": grace_seconds}
    cur = await conn.execute(query("catalog.sql", "expire_signing_secrets"), params)
    row = await cur.fetchone()
    old_until = row[0] if row is not None else None
    return await add_signing_secret(conn, destination), old_until


# --- connections ---------------------------------------------------------------------------


async def connect(conn: Conn, source: Source, destination: Destination,
                  event_filter: str | None = None) -> Connection:
    """Connect (or enable again); `event_filter` None keeps an existing connection's filter,
    "" clears it. The caller checks the filter compiles (filterlang.events)."""
    return await _one(conn, Connection, "connect", {
        "source_key": source.source_key, "destination_key": destination.destination_key,
        "source_id": source.id, "destination_id": destination.id,
        "set_filter": event_filter is not None, "event_filter": event_filter or None,
    }, "connection")


async def set_connection_filter(conn: Conn, source: Source, destination: Destination,
                                event_filter: str) -> Connection:
    """Replace a connection's filter ("": every event); NotFound if never connected."""
    return await _one(conn, Connection, "set_connection_filter", {
        "source_key": source.source_key, "destination_key": destination.destination_key,
        "source_id": source.id, "destination_id": destination.id,
        "event_filter": event_filter or None,
    }, f"connection {source.id!r} -> {destination.id!r}")


async def get_connection(conn: Conn, source: Source, destination: Destination) -> Connection:
    return await _one(conn, Connection, "get_connection", {
        "source_key": source.source_key, "destination_key": destination.destination_key,
        "source_id": source.id, "destination_id": destination.id,
    }, f"connection {source.id!r} -> {destination.id!r}")


async def disconnect(conn: Conn, source: Source, destination: Destination) -> Connection:
    return await _one(conn, Connection, "disconnect", {
        "source_key": source.source_key, "destination_key": destination.destination_key,
        "source_id": source.id, "destination_id": destination.id,
    }, f"connection {source.id!r} -> {destination.id!r}")


async def list_connections(conn: Conn, scope: int | None, *, tenant_id: str | None,
                           source_id: str | None, destination_id: str | None
                           ) -> list[Connection]:
    return await _all(conn, Connection, "list_connections", {
        "scope": scope, "tenant_id": tenant_id, "source_id": source_id,
        "destination_id": destination_id})


# --- admin tokens --------------------------------------------------------------------------


async def create_admin_token(conn: Conn, tenant: Tenant, token_id: str, name: str
                             ) -> tuple[AdminToken, str]:
    secret = new_secret(ADMIN_TOKEN_PREFIX)
    token = await _one(conn, AdminToken, "create_admin_token", {
        "token_hash": hash_secret(secret), "id": token_id, "tenant_key": tenant.tenant_key,
        "tenant_id": tenant.id, "name": name,
    }, "admin token")
    return token, secret


async def list_admin_tokens(conn: Conn, scope: int | None, *, tenant_id: str | None
                            ) -> list[AdminToken]:
    return await _all(conn, AdminToken, "list_admin_tokens",
                      {"scope": scope, "tenant_id": tenant_id})


async def revoke_admin_token(conn: Conn, token_id: str) -> AdminToken:
    """Operator only (the caller checks): tokens are not scoped here."""
    return await _one(conn, AdminToken, "revoke_admin_token", {"id": token_id},
                      f"admin token {token_id!r}")


async def token_owner(conn: Conn, secret: str) -> TokenOwner | None:
    cur = conn.cursor(row_factory=class_row(TokenOwner))
    await cur.execute(query("catalog.sql", "admin_token"), {"token_hash": hash_secret(secret)})
    return await cur.fetchone()
