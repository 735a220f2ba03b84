-- name: source_for_write_key
-- What ingest needs to route a source's events: the source, its tenant, and the destinations
-- it is connected to (enabled connections only; a paused destination still gets jobs, which
-- wait for it to resume), with each connection's event filter (NULL: every event).
SELECT s.source_key,
       s.id AS source_id,
       s.tenant_key,
       t.id AS tenant_id,
       s.enabled,
       s.rate_per_second,
       s.rate_burst,
       coalesce(array_agg(d.destination_key ORDER BY d.destination_key)
                FILTER (WHERE d.destination_key IS NOT NULL), '{}') AS destination_keys,
       coalesce(array_agg(d.id ORDER BY d.destination_key)
                FILTER (WHERE d.destination_key IS NOT NULL), '{}') AS destination_ids,
       coalesce(array_agg(c.event_filter ORDER BY d.destination_key)
                FILTER (WHERE d.destination_key IS NOT NULL), '{}') AS destination_filters
FROM write_keys k
JOIN sources s ON s.source_key = k.source_key
JOIN tenants t ON t.tenant_key = s.tenant_key
LEFT JOIN connections c ON c.source_key = s.source_key AND c.enabled
LEFT JOIN destinations d ON d.destination_key = c.destination_key
WHERE k.key_hash = %(key_hash)s
  AND (k.expires_at IS NULL OR k.expires_at > now())
GROUP BY s.source_key, t.tenant_key;
