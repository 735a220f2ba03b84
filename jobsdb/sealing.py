"""Secrets sealed at rest: webhook signing secrets, destination headers (a receiver's
`Authorization`, often) and the credentials in endpoints (nats://user:password@host) are
stored encrypted, so the database and every backup of it hold none of them in clear.

AES-256-GCM (an AEAD, from `cryptography`) under keys the operator gives in
RELAYQ_SECRET_KEYS: several, comma-separated; the first seals, all open, so a key is rotated by
putting a new one first, re-sealing (`relayq secrets rekey`), then dropping the old one. A
sealed value is bytes: version (1), the key's id (4 bytes, an HMAC of the key, so a wrong key
is told from a damaged value and no key is stored), a random 96-bit nonce, the ciphertext and
its tag. What a value is (signing secret, headers, endpoint) is its associated data, so one
cannot be passed off as another.

The keyring is the process's, installed once at start (`install`): the catalog's readers and
writers take it from there, as they take their SQL from files, rather than each caller
threading it through. Only the router and the admin service install one; ingest never reads
a sealed column.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg import AsyncConnection
from psycopg.rows import class_row

from jobsdb.errors import KeysRefused, SealError, translate
from jobsdb.sqlfile import query

__all__ = ["Keyring", "KeysRefused", "SealError", "install", "installed", "new_key", "start"]

VARIABLE = "RELAYQ_SECRET_KEYS"
_VERSION = b"\x01"
_NONCE = 12
_KID = 4
# What a sealed value is: its associated data.
SIGNING_SECRET = b"relayq:signing-secret"
HEADERS = b"relayq:headers"
ENDPOINT = b"relayq:endpoint"


def new_key() -> str:
    """A fresh key as RELAYQ_SECRET_KEYS takes it: 32 random bytes, URL-safe base64."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def key_id(key: bytes) -> bytes:
    return hmac.new(key, b"relayq secret key id", hashlib.sha256).digest()[:_KID]


class Keyring:
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("no key")
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}
        self.current = key_id(keys[0])
        self._current = self._ciphers[self.current]

    @classmethod
    def parse(cls, value: str) -> Keyring:
        """RELAYQ_SECRET_KEYS's value; ValueError saying what is wrong (never the key)."""
        keys = []
        for index, item in enumerate((p.strip() for p in value.split(",") if p.strip()), 1):
            try:
                key = base64.urlsafe_b64decode(item + "=" * (-len(item) % 4))
            except (binascii.Error, ValueError):
                raise ValueError(f"key {index} is not base64") from None
            if len(key) != 32:
                raise ValueError(f"key {index} is {len(key)} bytes; keys are 32 random bytes"
                                 " in base64 (`relayq secrets new-key` makes one)")
            keys.append(key)
        if not keys:
            raise ValueError("not set; give one or more keys (`relayq secrets new-key`"
                             " makes one)")
        return cls(keys)

    @property
    def ids(self) -> list[str]:
        return [kid.hex() for kid in self._ciphers]

    def seal(self, plaintext: bytes, what: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return (_VERSION + self.current + nonce
                + self._current.encrypt(nonce, plaintext, what))

    def open(self, sealed: bytes, what: bytes) -> bytes:
        sealed = bytes(sealed)
        if sealed[:1] != _VERSION or len(sealed) < 1 + _KID + _NONCE + 16:
            raise SealError("a sealed value of an unknown format")
        kid = sealed[1:1 + _KID]
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SealError(f"sealed under key {kid.hex()}, which is not among the keys in"
                            f" {VARIABLE}")
        nonce = sealed[1 + _KID:1 + _KID + _NONCE]
        try:
            return cipher.decrypt(nonce, sealed[1 + _KID + _NONCE:], what)
        except InvalidTag:
            raise SealError(f"a value sealed under key {kid.hex()} is damaged") from None

    def is_current(self, sealed: bytes) -> bool:
        return bytes(sealed[1:1 + _KID]) == self.current

    # --- what is sealed ----------------------------------------------------------------------

    def seal_text(self, text: str, what: bytes) -> bytes:
        return self.seal(text.encode(), what)

    def open_text(self, sealed: bytes, what: bytes) -> str:
        return self.open(sealed, what).decode()

    def seal_headers(self, headers: dict[str, str]) -> bytes | None:
        return self.seal(json.dumps(headers).encode(), HEADERS) if headers else None

    def open_headers(self, sealed: bytes | None) -> dict[str, str]:
        if sealed is None:
            return {}
        headers: dict[str, str] = json.loads(self.open(sealed, HEADERS))
        return headers

    def seal_endpoint(self, endpoint: str) -> tuple[str, bytes | None]:
        """(the endpoint as stored in clear, its sealed whole): an endpoint with credentials
        is stored without them, and sealed whole; one without is stored as it is."""
        shown = without_credentials(endpoint)
        if shown == endpoint:
            return endpoint, None
        return shown, self.seal_text(endpoint, ENDPOINT)


def without_credentials(endpoint: str) -> str:
    """`endpoint` less its user-info (user:password@ or token@), as logs may show it."""
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return endpoint
    if "@" not in parts.netloc:
        return endpoint
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


_installed: Keyring | None = None


def install(keyring: Keyring) -> None:
    """The process's keyring (router and admin, at start)."""
    global _installed
    _installed = keyring


def installed() -> Keyring:
    if _installed is None:
        raise SealError(f"no {VARIABLE} in this process: secrets cannot be read or written")
    return _installed


def open_row(keyring: Keyring, columns: dict[str, Any]) -> None:
    """Turn a destination row's sealed columns into its headers and endpoint, in place."""
    sealed_headers = columns.pop("sealed_headers", None)
    sealed_endpoint = columns.pop("sealed_endpoint", None)
    if sealed_headers is not None:
        columns["headers"] = keyring.open_headers(sealed_headers)
    if sealed_endpoint is not None:
        columns["endpoint"] = keyring.open_text(sealed_endpoint, ENDPOINT)


# --- at start, and `relayq secrets rekey` ----------------------------------------------------


async def key_ids_in_use(conn: AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(query("secrets.sql", "key_ids_in_use"))
    return {bytes(row[0]).hex() for row in await cur.fetchall()}


async def check_keys(conn: AsyncConnection[Any], keyring: Keyring) -> None:
    """KeysRefused unless every key the database's sealed values name was given."""
    missing = sorted(await key_ids_in_use(conn) - set(keyring.ids))
    if missing:
        raise KeysRefused(
            f"{VARIABLE}: the database holds secrets sealed under key"
            f" {', '.join(missing)}, which is not among the {len(keyring.ids)} key(s) given"
            f" ({', '.join(keyring.ids)}): a wrong or missing key; nothing is sent unsigned")


class _StoredSecret(NamedTuple):
    secret_id: int
    secret: str | None
    sealed: bytes | None


class _StoredDestination(NamedTuple):
    destination_key: int
    endpoint: str
    headers: dict[str, str]
    sealed_endpoint: bytes | None
    sealed_headers: bytes | None


async def seal_all(conn: AsyncConnection[Any], keyring: Keyring, *, rekey: bool) -> int:
    """Seal what is stored in clear (rows written before sealing existed) and, with `rekey`,
    re-seal under the first key what another key sealed. The caller owns the transaction;
    rows are locked as they are read, so two processes doing it at once wait for each
    other. Returns how many values changed."""
    secrets: list[dict[str, Any]] = []
    cur = conn.cursor(row_factory=class_row(_StoredSecret))
    await cur.execute(query("secrets.sql", "signing_secrets_to_seal"))
    for row in await cur.fetchall():
        secret_id, secret, sealed = row.secret_id, row.secret, row.sealed
        if sealed is not None and (not rekey or keyring.is_current(sealed)):
            continue
        # One form or the other (a CHECK in migration 0013): in clear, or sealed.
        plain = keyring.open_text(sealed, SIGNING_SECRET) if sealed is not None else secret
        assert plain is not None
        secrets.append({"secret_id": secret_id,
                        "sealed": keyring.seal_text(plain, SIGNING_SECRET)})
    rows: list[dict[str, Any]] = []
    dest_cur = conn.cursor(row_factory=class_row(_StoredDestination))
    await dest_cur.execute(query("secrets.sql", "destinations_to_seal"))
    for dest in await dest_cur.fetchall():
        key, endpoint, headers = dest.destination_key, dest.endpoint, dest.headers
        sealed_endpoint, sealed_headers = dest.sealed_endpoint, dest.sealed_headers
        stale = [s for s in (sealed_endpoint, sealed_headers) if s is not None
                 and not keyring.is_current(s)]
        clear = bool(headers) or without_credentials(endpoint) != endpoint
        if not clear and not (rekey and stale):
            continue
        if sealed_endpoint is not None:
            endpoint = keyring.open_text(sealed_endpoint, ENDPOINT)
        plain_headers = {**keyring.open_headers(sealed_headers), **headers}
        shown, new_endpoint = keyring.seal_endpoint(endpoint)
        rows.append({"destination_key": key, "endpoint": shown,
                     "sealed_endpoint": new_endpoint,
                     "sealed_headers": keyring.seal_headers(plain_headers)})
    # executemany pipelines the updates: one round trip for thousands, not one each.
    if secrets:
        await cur.executemany(query("secrets.sql", "set_sealed_signing_secret"), secrets)
    if rows:
        await cur.executemany(query("secrets.sql", "set_sealed_destination"), rows)
    return len(secrets) + len(rows)


async def lock(conn: AsyncConnection[Any]) -> None:
    """One process seals or re-seals at a time (until the caller's transaction ends)."""
    await conn.execute(query("secrets.sql", "lock"))


async def prepare(conn: AsyncConnection[Any], keyring: Keyring) -> int:
    """At the start of a process that reads secrets: refuse to go on with a key missing, then
    seal what is in clear. Runs in its own transaction, under an advisory lock."""
    async with conn.transaction():
        await lock(conn)
        await check_keys(conn, keyring)
        return await seal_all(conn, keyring, rekey=False)


async def start(dsn: str, keyring: Keyring, *, application_name: str) -> int:
    """What a router or admin service does at start, after migrating: install the keyring,
    check it against the database (KeysRefused stops the process with one line), and seal
    the rows stored in clear before sealing existed."""
    install(keyring)
    try:
        async with await AsyncConnection.connect(dsn, autocommit=True,
                                                 application_name=application_name) as conn:
            return await prepare(conn, keyring)
    except psycopg.Error as exc:
        raise translate(exc) from exc
