-- relayq schema 11: webhooks in batches, and which batch an attempt travelled in.
--
-- A webhook destination may take its jobs as JSON arrays: up to `batch_max_events` events
-- and `batch_max_bytes` bytes a request, waiting up to `batch_linger_ms` for a fuller batch.
-- 1 (the default) keeps one event per request, as before. Every attempt of a batched job
-- records the batch's webhook-id, so a job's history says which request carried it.
ALTER TABLE destinations
    ADD COLUMN batch_max_events integer NOT NULL DEFAULT 1
        CHECK (batch_max_events BETWEEN 1 AND 10000),
    ADD COLUMN batch_max_bytes integer NOT NULL DEFAULT 1048576
        CHECK (batch_max_bytes BETWEEN 1024 AND 67108864),
    ADD COLUMN batch_linger_ms integer NOT NULL DEFAULT 0
        CHECK (batch_linger_ms BETWEEN 0 AND 60000);

CREATE OR REPLACE VIEW destination_rows AS
SELECT d.destination_key, d.id, d.tenant_key, t.id AS tenant_id, d.name, d.type, d.endpoint,
       d.headers, d.min_backoff_ms, d.max_backoff_ms, d.max_attempts, d.max_retry_window_s,
       d.rate_per_second, d.rate_burst, d.concurrency, d.timeout_ms, d.paused,
       d.created_at, d.updated_at,
       d.circuit_after_s, d.circuit_min_failures, d.circuit_probe_s, d.circuit_opened_at,
       d.circuit_reason,
       d.batch_max_events, d.batch_max_bytes, d.batch_linger_ms
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key;

ALTER TABLE job_statuses ADD COLUMN batch text;
