-- relayq schema 13: secrets sealed at rest (jobsdb/sealing.py).
--
-- Signing secrets, destination headers and the credentials in endpoints are stored
-- encrypted (AES-GCM under RELAYQ_SECRET_KEYS), so the database and its backups hold none in
-- clear. SQL cannot seal (the key never reaches Postgres), so this migration only makes room:
-- the first router or admin service to start with the keys seals the rows written before it
-- (jobsdb.sealing.prepare), as `relayq secrets rekey` does.
--
-- A sealed value: version byte, key id (4 bytes), nonce (12), ciphertext and tag.

-- Signing secrets: `sealed` replaces `secret`, which stays NULL once sealed.
ALTER TABLE destination_secrets
    ALTER COLUMN secret DROP NOT NULL,
    ADD COLUMN sealed bytea,
    ADD CONSTRAINT destination_secrets_one_form CHECK ((secret IS NULL) <> (sealed IS NULL));

-- Headers: sealed whole as a JSON object (`headers` is then '{}'); the endpoint: when it
-- carries credentials (nats://user:password@host/...), `endpoint` keeps it without them, for
-- operators' eyes, and `sealed_endpoint` holds it whole.
ALTER TABLE destinations
    ADD COLUMN sealed_headers bytea,
    ADD COLUMN sealed_endpoint bytea;

CREATE OR REPLACE VIEW destination_rows AS
SELECT d.destination_key, d.id, d.tenant_key, t.id AS tenant_id, d.name, d.type, d.endpoint,
       d.headers, d.min_backoff_ms, d.max_backoff_ms, d.max_attempts, d.max_retry_window_s,
       d.rate_per_second, d.rate_burst, d.concurrency, d.timeout_ms, d.paused,
       d.created_at, d.updated_at,
       d.circuit_after_s, d.circuit_min_failures, d.circuit_probe_s, d.circuit_opened_at,
       d.circuit_reason,
       d.batch_max_events, d.batch_max_bytes, d.batch_linger_ms,
       d.sealed_headers, d.sealed_endpoint
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key;
