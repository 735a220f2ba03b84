-- relayq schema 9: signing secrets for webhooks (Standard Webhooks).
--
-- The router signs every webhook request with HMAC-SHA256, so it needs the secret itself:
-- unlike write keys and admin tokens (which relayq only checks, and stores as hashes), these
-- are stored as they are. They are read only by the router's destination load
-- (sql/destinations.sql) and written by the admin service, which shows a secret once (on
-- CreateDestination and RotateSigningSecret) and never lists it.
--
-- A destination has one secret in force, plus, during a rotation's grace period, the ones it
-- replaced (their expires_at set): every secret not yet expired signs, so receivers holding
-- either the old or the new secret verify each request while they switch over.
CREATE TABLE destination_secrets (
    secret_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination_key  integer NOT NULL REFERENCES destinations ON DELETE CASCADE,
    -- whsec_ + base64 of 32 random bytes.
    secret           text NOT NULL CHECK (secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz
);

CREATE INDEX destination_secrets_destination_idx ON destination_secrets (destination_key);

-- A rotation reaches running routers as any configuration change does.
CREATE TRIGGER destination_secrets_changed
    AFTER INSERT OR UPDATE OR DELETE ON destination_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();

-- Webhook destinations made before this migration have no secret, and their requests carry
-- no webhook-signature until an operator rotates one in (RotateSigningSecret): a secret made
-- here could never be shown to anyone, so it would protect nothing.
