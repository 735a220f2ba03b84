-- relayq schema 14: sessions of the operator console (relayq-admin's HTTP address).
--
-- A signed-in browser holds a random session id in a cookie; only its SHA-256 is stored, so
-- this table cannot be replayed from a backup. A session is a tenant token's (token_id) or the
-- operator's (token_id NULL, with the SHA-256 of the operator token it signed in with: a new
-- RELAYQ_ADMIN_TOKEN ends the old token's sessions). Every request reads its session joined
-- to its token, so revoking the token ends its sessions at once, whichever admin process
-- serves them; deleting the token deletes them. Kept in Postgres, not in one process's
-- memory, because admin is stateless and may run several behind a load balancer.
CREATE TABLE console_sessions (
    session_hash     bytea PRIMARY KEY,
    token_id         text REFERENCES admin_tokens (id) ON DELETE CASCADE,
    operator_digest  bytea,
    -- The synchronizer token every form of this session carries (CSRF).
    csrf             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    CHECK ((token_id IS NULL) <> (operator_digest IS NULL))
);

-- Expired sessions are deleted as new ones start.
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
