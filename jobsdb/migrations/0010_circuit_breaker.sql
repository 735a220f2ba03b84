-- relayq schema 10: a circuit breaker per destination.
--
-- A destination whose every attempt has failed for `circuit_after_s` seconds (and at least
-- `circuit_min_failures` attempts) is opened by the router that saw it: its jobs keep
-- waiting, none is aborted for it, and routers only probe it with one delivery every
-- `circuit_probe_s` seconds until one succeeds. Without it, a dead endpoint with ten thousand
-- users gets each user's head job retried every max backoff, forever. The open circuit lives
-- here, on the destination, so every router, admin and operator sees the same state, and an
-- operator can open or close it by hand. circuit_after_s = 0 turns the breaker off.
ALTER TABLE destinations
    ADD COLUMN circuit_after_s integer NOT NULL DEFAULT 600
        CHECK (circuit_after_s BETWEEN 0 AND 2592000),
    ADD COLUMN circuit_min_failures integer NOT NULL DEFAULT 20
        CHECK (circuit_min_failures BETWEEN 1 AND 1000000),
    ADD COLUMN circuit_probe_s integer NOT NULL DEFAULT 30
        CHECK (circuit_probe_s BETWEEN 1 AND 86400),
    -- Set while the circuit is open.
    ADD COLUMN circuit_opened_at timestamptz,
    ADD COLUMN circuit_reason text;

CREATE OR REPLACE VIEW destination_rows AS
SELECT d.destination_key, d.id, d.tenant_key, t.id AS tenant_id, d.name, d.type, d.endpoint,
       d.headers, d.min_backoff_ms, d.max_backoff_ms, d.max_attempts, d.max_retry_window_s,
       d.rate_per_second, d.rate_burst, d.concurrency, d.timeout_ms, d.paused,
       d.created_at, d.updated_at,
       d.circuit_after_s, d.circuit_min_failures, d.circuit_probe_s, d.circuit_opened_at,
       d.circuit_reason
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key;
