-- name: load_all
-- Every destination with what the router needs to deliver to it. Read whole on start and on
-- every configuration change: ten thousand rows are one quick query.
-- The columns of catalog.sql's get_destination (jobsdb.catalog.Destination).
SELECT d.destination_key, d.id, d.tenant_key, t.id, d.name, d.type, d.endpoint, d.headers,
       d.min_backoff_ms, d.max_backoff_ms, d.max_attempts, d.max_retry_window_s,
       d.rate_per_second, d.rate_burst, d.concurrency, d.timeout_ms, d.paused,
       d.created_at, d.updated_at
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key
ORDER BY d.destination_key;
