"""Sessions of the operator console, one module per table (see 0014_console.sql).

A session id is never stored, only its SHA-256 (`keys.hash_secret`). Reading a session also
reads whether its token still stands: a revoked token's sessions read as absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row

from jobsdb.keys import hash_secret

Conn = AsyncConnection[Any]

_CREATE = """
INSERT INTO console_sessions (session_hash, token_id, operator_digest, csrf, expires_at)
VALUES (%(session_hash)s, %(token_id)s, %(operator_digest)s, %(csrf)s,
        now() + make_interval(secs => %(lifetime)s))
"""

# A tenant token's session stands while its token is not revoked; the token's tenant comes
# along, as admin calls read it (catalog.sql `admin_token`).
_READ = """
SELECT s.token_id, s.operator_digest, s.csrf, a.tenant_key, t.id AS tenant_id
FROM console_sessions s
LEFT JOIN admin_tokens a ON a.id = s.token_id
LEFT JOIN tenants t ON t.tenant_key = a.tenant_key
WHERE s.session_hash = %(session_hash)s
  AND s.expires_at > now()
  AND (s.token_id IS NULL OR a.revoked_at IS NULL)
"""

_DELETE = "DELETE FROM console_sessions WHERE session_hash = %(session_hash)s"

# Expired sessions, and those of revoked tokens: a handful of rows at each sign-in.
_PURGE = """
DELETE FROM console_sessions s
WHERE s.expires_at <= now()
   OR s.token_id IN (SELECT id FROM admin_tokens WHERE revoked_at IS NOT NULL)
"""


@dataclass(frozen=True, slots=True)
class Session:
    # None: the operator's session.
    token_id: str | None
    operator_digest: bytes | None
    csrf: str
    tenant_key: int | None
    tenant_id: str | None


async def create(conn: Conn, session_id: str, *, token_id: str | None,
                 operator_digest: bytes | None, csrf: str, lifetime_seconds: float) -> None:
    await conn.execute(_PURGE)
    await conn.execute(_CREATE, {
        "session_hash": hash_secret(session_id), "token_id": token_id,
        "operator_digest": operator_digest, "csrf": csrf, "lifetime": lifetime_seconds})


async def read(conn: Conn, session_id: str) -> Session | None:
    cur = conn.cursor(row_factory=class_row(Session))
    await cur.execute(_READ, {"session_hash": hash_secret(session_id)})
    return await cur.fetchone()


async def delete(conn: Conn, session_id: str) -> None:
    await conn.execute(_DELETE, {"session_hash": hash_secret(session_id)})
