-- Events of the log as operators find them: list a source's, get one by id or by message id,
-- and the connections its destinations are reached by (jobsdb/events.py). Every query is
-- limited to a tenant scope (NULL: the operator).

-- name: by_id
SELECT e.event_id, t.id AS tenant_id, s.id AS source_id, e.source_key, e.user_id,
       e.message_id, e.created_at, e.destinations, e.document
FROM events e
JOIN tenants t ON t.tenant_key = e.tenant_key
JOIN sources s ON s.source_key = e.source_key
WHERE e.event_id = %(event_id)s
  AND (%(scope)s::integer IS NULL OR e.tenant_key = %(scope)s);

-- name: indexed_below
-- Where the events partitions without a (valid) message-id index begin: the partition
-- ingest writes, and any maintenance has not indexed yet (NULL: none).
SELECT min((regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(\d+)''?\)'))[1]::bigint)
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'events'::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_index x JOIN pg_class ix ON ix.oid = x.indexrelid
                  WHERE x.indrelid = c.oid AND x.indisvalid
                    AND ix.relname = c.relname || '_lookup');

-- name: by_message
-- A source's events by message id, in [low, high) of event ids. Below indexed_below every
-- partition has an index on (source_key, message_id) (maintenance builds it:
-- jobsdb.partitions.index_lookups), so ingest never pays for it; above, the partition
-- ingest writes is scanned. Run unprepared: the plan prunes partitions by the bounds.
SELECT e.event_id, t.id AS tenant_id, s.id AS source_id, e.source_key, e.user_id,
       e.message_id, e.created_at, e.destinations, e.document
FROM events e
JOIN tenants t ON t.tenant_key = e.tenant_key
JOIN sources s ON s.source_key = e.source_key
WHERE e.source_key = %(source_key)s
  AND e.message_id = %(message_id)s
  AND e.event_id >= %(low)s
  AND e.event_id < %(high)s
  AND (%(scope)s::integer IS NULL OR e.tenant_key = %(scope)s);

-- name: connections
-- Every connection the source has or had (a connection is disabled, never deleted), with
-- its destination: the destinations an event of it may stand at.
SELECT d.id AS destination_id, c.destination_key, c.slot, c.enabled, c.created_at,
       c.event_filter
FROM connections c
JOIN destinations d ON d.destination_key = c.destination_key
WHERE c.source_key = %(source_key)s
ORDER BY d.id;

-- name: names
-- Destination ids by key (the destinations an event named).
SELECT destination_key, id FROM destinations WHERE destination_key = ANY(%(keys)s::integer[]);

-- name: list
-- One window of a source's events, (after, upto) by event id, matching `{where}` (a filter
-- compiled over `j`, the event with its document as j.payload, parsed only if the filter
-- reads it). Its own parameters by name, the filter's named f0, f1, ...
SELECT j.event_id, j.tenant_id, j.source_id, j.source_key, j.user_id, j.message_id,
       j.created_at, j.destinations, CASE WHEN %(include_payload)s THEN j.document END AS document
FROM (SELECT e.*, e.document::jsonb AS payload, t.id AS tenant_id, s.id AS source_id
      FROM events e
      JOIN tenants t ON t.tenant_key = e.tenant_key
      JOIN sources s ON s.source_key = e.source_key) j
WHERE j.source_key = %(source_key)s
  AND j.event_id > %(after)s
  AND j.event_id < %(upto)s
  AND ({where})
ORDER BY j.event_id
LIMIT %(limit)s;

-- name: first_after
-- The first event of the log after an id (one probe of each partition's primary key).
SELECT min(event_id) FROM events WHERE event_id > %(after)s;
