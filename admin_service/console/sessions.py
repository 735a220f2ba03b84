"""Console sign-in: a session cookie standing for an admin token, kept in Postgres.

The cookie (HttpOnly, SameSite=Strict, Secure under TLS) holds a random session id; the
database holds only its hash, the token it stands for (by id, never the secret) and the CSRF
token its forms carry. Each request reads the session anew, so a revoked token, or a changed
operator token, ends its sessions at once.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from psycopg_pool import AsyncConnectionPool

from jobsdb import console_sessions
from jobsdb.keys import hash_secret
from jobsdb.pool import transaction
from relayq.auth import OPERATOR, Authenticator, Caller, tenant_caller

COOKIE = "relayq_session"


@dataclass(frozen=True)
class Session:
    id: str
    caller: Caller
    # Every form of this session carries it; a POST without it is refused.
    csrf: str

    def csrf_matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, pool: AsyncConnectionPool, auth: Authenticator, operator_token: str,
                 lifetime_seconds: int) -> None:
        self._pool = pool
        self._auth = auth
        self._operator_digest = hash_secret(operator_token)
        self.lifetime_seconds = lifetime_seconds

    async def sign_in(self, token: str) -> Session:
        """A new session for whoever presents `token`; Unauthenticated if nobody does."""
        caller = await self._auth.caller_for_token(token)
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with transaction(self._pool) as conn:
            await console_sessions.create(
                conn, session_id, token_id=caller.token_id,
                operator_digest=self._operator_digest if caller.is_operator else None,
                csrf=csrf, lifetime_seconds=self.lifetime_seconds)
        return Session(session_id, caller, csrf)

    async def find(self, session_id: str) -> Session | None:
        """The session this id stands for, while its token still does; None otherwise."""
        async with transaction(self._pool) as conn:
            row = await console_sessions.read(conn, session_id)
        if row is None:
            return None
        if row.token_id is None:
            if row.operator_digest is None or not hmac.compare_digest(
                    row.operator_digest, self._operator_digest):
                return None  # signed in with an operator token no longer configured
            return Session(session_id, OPERATOR, row.csrf)
        assert row.tenant_key is not None
        assert row.tenant_id is not None
        return Session(session_id, tenant_caller(row.token_id, row.tenant_key, row.tenant_id),
                       row.csrf)

    async def sign_out(self, session_id: str) -> None:
        async with transaction(self._pool) as conn:
            await console_sessions.delete(conn, session_id)
