-- relayq schema 6: one column list per catalog row type.
--
-- A destination as every reader sees it (admin's Get/List, the router's load) and a source as
-- admin shows it were each spelled out, column by column, in several queries, and read back by
-- position. These views are the one list: queries select from them, and jobsdb.catalog maps
-- their columns to its dataclasses by name (psycopg's class_row), so a new column is added
-- here and in the dataclass, nowhere else.
CREATE VIEW destination_rows AS
SELECT d.destination_key, d.id, d.tenant_key, t.id AS tenant_id, d.name, d.type, d.endpoint,
       d.headers, d.min_backoff_ms, d.max_backoff_ms, d.max_attempts, d.max_retry_window_s,
       d.rate_per_second, d.rate_burst, d.concurrency, d.timeout_ms, d.paused,
       d.created_at, d.updated_at
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key;

CREATE VIEW source_rows AS
SELECT s.source_key, s.id, s.tenant_key, t.id AS tenant_id, s.name, s.enabled, s.created_at,
       s.rate_per_second, s.rate_burst
FROM sources s
JOIN tenants t ON t.tenant_key = s.tenant_key;

-- A destination's type is checked by the admin service against the types the router can
-- deliver to (relayq.destination_types). A CHECK constraint here listed them a second time,
-- and every new type would have needed a migration.
ALTER TABLE destinations DROP CONSTRAINT destinations_type_check;
ALTER TABLE destinations ADD CONSTRAINT destinations_type_check
    CHECK (type ~ '^[a-z][a-z0-9_]{0,31}$');
