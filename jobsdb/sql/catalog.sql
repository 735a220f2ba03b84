-- The catalog as operators see it: tenants, sources, write keys, destinations,
-- connections, admin tokens. Every read takes %(scope)s: NULL for the operator (everything),
-- or a tenant_key for a tenant-scoped token, which then sees only its own rows. A row outside
-- the scope is simply not found, so another tenant's objects are never shown.

-- name: create_tenant
INSERT INTO tenants (id, name) VALUES (%(id)s, %(name)s)
RETURNING tenant_key, id, name, created_at;

-- name: get_tenant
SELECT tenant_key, id, name, created_at
FROM tenants
WHERE id = %(id)s
  AND (%(scope)s::integer IS NULL OR tenant_key = %(scope)s);

-- name: list_tenants
-- Keyset pagination by id: pages stay stable while tenants are added.
SELECT tenant_key, id, name, created_at
FROM tenants
WHERE (%(scope)s::integer IS NULL OR tenant_key = %(scope)s)
  AND id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: create_source
INSERT INTO sources (id, tenant_key, name, rate_per_second, rate_burst)
VALUES (%(id)s, %(tenant_key)s, %(name)s, %(rate_per_second)s, %(rate_burst)s)
RETURNING source_key;

-- name: get_source
SELECT *
FROM source_rows
WHERE id = %(id)s
  AND (%(scope)s::integer IS NULL OR tenant_key = %(scope)s);

-- name: list_sources
SELECT *
FROM source_rows
WHERE (%(scope)s::integer IS NULL OR tenant_key = %(scope)s)
  AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
  AND id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: update_source
UPDATE sources
SET name = coalesce(%(name)s, name),
    enabled = coalesce(%(enabled)s, enabled),
    rate_per_second = coalesce(%(rate_per_second)s, rate_per_second),
    rate_burst = coalesce(%(rate_burst)s, rate_burst)
WHERE source_key = %(source_key)s
RETURNING source_key;

-- name: add_write_key
INSERT INTO write_keys (key_hash, source_key) VALUES (%(key_hash)s, %(source_key)s);

-- name: expire_write_keys
-- Rotation: the source's current keys stop working after the grace period (0: at once).
-- A key that already expires sooner keeps its earlier expiry.
UPDATE write_keys
SET expires_at = now() + make_interval(secs => %(grace_seconds)s)
WHERE source_key = %(source_key)s
  AND (expires_at IS NULL OR expires_at > now() + make_interval(secs => %(grace_seconds)s));

-- name: create_destination
INSERT INTO destinations (id, tenant_key, name, type, endpoint, headers, min_backoff_ms,
                          max_backoff_ms, max_attempts, max_retry_window_s, rate_per_second,
                          rate_burst, concurrency, timeout_ms, paused, circuit_after_s,
                          circuit_min_failures, circuit_probe_s, batch_max_events,
                          batch_max_bytes, batch_linger_ms, sealed_headers, sealed_endpoint)
VALUES (%(id)s, %(tenant_key)s, %(name)s, %(type)s, %(endpoint)s, %(headers)s,
        %(min_backoff_ms)s, %(max_backoff_ms)s, %(max_attempts)s, %(max_retry_window_s)s,
        %(rate_per_second)s, %(rate_burst)s, %(concurrency)s, %(timeout_ms)s, %(paused)s,
        %(circuit_after_s)s, %(circuit_min_failures)s, %(circuit_probe_s)s,
        %(batch_max_events)s, %(batch_max_bytes)s, %(batch_linger_ms)s,
        %(sealed_headers)s, %(sealed_endpoint)s)
RETURNING destination_key;

-- name: get_destination
SELECT *
FROM destination_rows
WHERE id = %(id)s
  AND (%(scope)s::integer IS NULL OR tenant_key = %(scope)s);

-- name: list_destinations
SELECT *
FROM destination_rows
WHERE (%(scope)s::integer IS NULL OR tenant_key = %(scope)s)
  AND (%(tenant_id)s::text IS NULL OR tenant_id = %(tenant_id)s)
  AND id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: open_circuit
-- Open a destination's circuit unless it is open already (the first opener's time and reason
-- stay). Not a configuration change: updated_at is left alone.
UPDATE destinations
SET circuit_opened_at = now(), circuit_reason = %(reason)s
WHERE destination_key = %(destination_key)s AND circuit_opened_at IS NULL;

-- name: close_circuit
UPDATE destinations
SET circuit_opened_at = NULL, circuit_reason = NULL
WHERE destination_key = %(destination_key)s AND circuit_opened_at IS NOT NULL;

-- name: add_signing_secret
-- Sealed (jobsdb.sealing): the secret itself is never stored.
INSERT INTO destination_secrets (destination_key, sealed)
VALUES (%(destination_key)s, %(sealed)s);

-- name: expire_signing_secrets
-- Rotation: the destination's secrets in force keep signing for the grace period (0: stop at
-- once); one that already stops sooner keeps its time. Secrets long expired go (they can
-- never sign again). Returns when the last of the old secrets stops signing (NULL: none).
WITH gone AS (
    DELETE FROM destination_secrets
    WHERE destination_key = %(destination_key)s
      AND expires_at <= now()
), expired AS (
    UPDATE destination_secrets
    SET expires_at = least(coalesce(expires_at, 'infinity'),
                           now() + make_interval(secs => %(grace_seconds)s))
    WHERE destination_key = %(destination_key)s
      AND (expires_at IS NULL OR expires_at > now())
    RETURNING expires_at
)
SELECT max(expires_at) FROM expired;

-- name: connect
-- Connecting twice is harmless; connecting a disconnected pair enables it again. The filter
-- is replaced only when the caller gives one (%(set_filter)s; NULL: every event).
INSERT INTO connections AS c (source_key, destination_key, event_filter)
VALUES (%(source_key)s, %(destination_key)s, %(event_filter)s)
ON CONFLICT (source_key, destination_key) DO UPDATE
SET enabled = true,
    event_filter = CASE WHEN %(set_filter)s THEN excluded.event_filter ELSE c.event_filter END
RETURNING %(source_id)s::text AS source_id, %(destination_id)s::text AS destination_id,
          enabled, created_at, coalesce(event_filter, '') AS filter, slot;

-- name: disconnect
UPDATE connections
SET enabled = false
WHERE source_key = %(source_key)s AND destination_key = %(destination_key)s
RETURNING %(source_id)s::text AS source_id, %(destination_id)s::text AS destination_id,
          enabled, created_at, coalesce(event_filter, '') AS filter, slot;

-- name: set_connection_filter
UPDATE connections
SET event_filter = %(event_filter)s
WHERE source_key = %(source_key)s AND destination_key = %(destination_key)s
RETURNING %(source_id)s::text AS source_id, %(destination_id)s::text AS destination_id,
          enabled, created_at, coalesce(event_filter, '') AS filter, slot;

-- name: get_connection
SELECT %(source_id)s::text AS source_id, %(destination_id)s::text AS destination_id,
       enabled, created_at, coalesce(event_filter, '') AS filter, slot
FROM connections
WHERE source_key = %(source_key)s AND destination_key = %(destination_key)s;

-- name: list_connections
SELECT s.id AS source_id, d.id AS destination_id, c.enabled, c.created_at,
       coalesce(c.event_filter, '') AS filter, c.slot
FROM connections c
JOIN sources s ON s.source_key = c.source_key
JOIN destinations d ON d.destination_key = c.destination_key
JOIN tenants t ON t.tenant_key = s.tenant_key
WHERE (%(scope)s::integer IS NULL OR s.tenant_key = %(scope)s)
  AND (%(tenant_id)s::text IS NULL OR t.id = %(tenant_id)s)
  AND (%(source_id)s::text IS NULL OR s.id = %(source_id)s)
  AND (%(destination_id)s::text IS NULL OR d.id = %(destination_id)s)
ORDER BY s.id, d.id
LIMIT 10000;

-- name: create_admin_token
INSERT INTO admin_tokens (token_hash, id, tenant_key, name)
VALUES (%(token_hash)s, %(id)s, %(tenant_key)s, %(name)s)
RETURNING id, %(tenant_id)s::text AS tenant_id, name, created_at, revoked_at;

-- name: list_admin_tokens
SELECT a.id, t.id AS tenant_id, a.name, a.created_at, a.revoked_at
FROM admin_tokens a
JOIN tenants t ON t.tenant_key = a.tenant_key
WHERE (%(scope)s::integer IS NULL OR a.tenant_key = %(scope)s)
  AND (%(tenant_id)s::text IS NULL OR t.id = %(tenant_id)s)
ORDER BY t.id, a.created_at, a.id
LIMIT 10000;

-- name: revoke_admin_token
-- coalesce keeps the first revocation's time, so revoking twice is harmless.
UPDATE admin_tokens a
SET revoked_at = coalesce(a.revoked_at, now())
FROM tenants t
WHERE a.id = %(id)s
  AND t.tenant_key = a.tenant_key
RETURNING a.id, t.id AS tenant_id, a.name, a.created_at, a.revoked_at;

-- name: admin_token
-- Who a tenant-scoped token is: one index probe per admin call.
SELECT a.id AS token_id, a.tenant_key, t.id AS tenant_id
FROM admin_tokens a
JOIN tenants t ON t.tenant_key = a.tenant_key
WHERE a.token_hash = %(token_hash)s
  AND a.revoked_at IS NULL;
