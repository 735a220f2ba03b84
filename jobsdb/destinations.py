"""Every destination at once, as the router loads them on start and after a configuration
change that touched one (a digest Postgres makes says whether it did). The rows are
jobsdb.catalog.Destination, read through the same view (destination_rows) as the admin
service reads them one at a time."""

from __future__ import annotations

from datetime import datetime
from typing import Any, LiteralString, NamedTuple

from psycopg import AsyncConnection
from psycopg.rows import class_row, kwargs_row

from jobsdb import sealing
from jobsdb.catalog import Destination, SigningSecret
from jobsdb.sqlfile import query


async def load_all(conn: AsyncConnection[Any]) -> dict[int, Destination]:
    """Each destination with its signing secrets in force (which only the router reads).

    This runs on the router's event loop at every configuration change, so each row is made
    once, secrets included: copying ten thousand frozen rows afterwards to add their secrets
    (dataclasses.replace) took 40% of it under cProfile."""

    keyring = sealing.installed()

    def destination(secrets: list[str | None], sealed_secrets: list[bytes | None],
                    expiries: list[datetime | None], **columns: Any) -> Destination:
        """The row with its sealed columns opened (jobsdb.sealing). One that cannot be (a key
        this process was not given) is kept, marked unreadable, without its secrets: the
        router delivers nothing to it, rather than anything unsigned."""
        try:
            sealing.open_row(keyring, columns)
            opened = [secret if sealed is None
                      else keyring.open_text(sealed, sealing.SIGNING_SECRET)
                      for secret, sealed in zip(secrets, sealed_secrets, strict=True)]
        except sealing.SealError as exc:
            columns.update(headers={}, endpoint=sealing.without_credentials(columns["endpoint"]))
            return Destination(**columns, unreadable=str(exc))
        return Destination(**columns, signing_secrets=tuple(
            SigningSecret(secret, expires) for secret, expires in zip(opened, expiries,
                                                                     strict=True)
            if secret is not None))

    cur = conn.cursor(row_factory=kwargs_row(destination))
    await cur.execute(query("destinations.sql", "load_all"), binary=True)
    return {row.destination_key: row for row in await cur.fetchall()}


class Connection(NamedTuple):
    """An enabled connection as a router fans events out along it."""

    source_key: int
    destination_key: int
    slot: int
    event_filter: str | None
    # A backfilled connection takes from the log only events after this id (0: every one),
    # and none while its backfill's rows are being written.
    backfill_after: int = 0
    backfilling: bool = False


async def load_connections(conn: AsyncConnection[Any]) -> list[Connection]:
    cur = conn.cursor(row_factory=class_row(Connection))
    await cur.execute(query("destinations.sql", "load_connections"))
    return await cur.fetchall()


def _digest_of(name: str) -> LiteralString:
    """A digest of exactly what a query reads, made by Postgres (the statement wraps it)."""
    return ("SELECT md5(string_agg(loaded::text, E'\\n' ORDER BY loaded::text))"
            " FROM (" + query("destinations.sql", name).rstrip().removesuffix(";")
            + ") AS loaded")


# Rows are agreed by their text, so the digest does not depend on the order a plan reads them.
_DIGEST: LiteralString = ("SELECT coalesce((" + _digest_of("load_all") + "), '') || '/'"
                          " || coalesce((" + _digest_of("load_connections") + "), '')")


class Loaded(NamedTuple):
    digest: str
    destinations: dict[int, Destination]
    connections: list[Connection]


async def load_if_changed(conn: AsyncConnection[Any], last_digest: str | None
                          ) -> tuple[int, Loaded | None]:
    """The connections' version (migration 0012), and every destination (load_all) and
    enabled connection with a digest of them all, or None when the digest is still
    `last_digest`: nothing changed since that load.

    The router reloads at every configuration change and every 30 s, on its event loop;
    at ten thousand destinations making the rows costs it ~200 ms of CPU, a stall for every
    lane, while the digest costs it nothing (Postgres ~60 ms, awaited). Must be the first
    statement of its transaction: the digest and the rows then come from one snapshot, so
    the digest kept is that of the rows loaded, and a change undone later is not missed."""
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cur = await conn.execute("SELECT version FROM relayq_config_version")
    version = int((await cur.fetchone() or [0])[0])
    row = await (await conn.execute(_DIGEST)).fetchone()
    digest = (row[0] if row is not None else None) or ""
    if digest == last_digest:
        return version, None
    return version, Loaded(digest, await load_all(conn), await load_connections(conn))
