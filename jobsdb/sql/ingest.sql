-- name: lock_generations
-- Taken first in every ingest transaction, as a statement of its own. The shared lock keeps
-- dedup rotation out until commit, and the next statement takes its snapshot after the lock is
-- granted, so it sees the current generation. (Reading the generation in this same statement
-- would use a snapshot older than the lock, possibly from before a rotation just committed.)
-- lock_event_log_writer() marks this transaction as a writer of events before it draws ids,
-- so readers of the log stay below them until it ends (migration 0012, event_log_horizon).
SELECT pg_advisory_xact_lock_shared(%(lock)s), lock_event_log_writer();

-- name: store_events
-- The whole write of a group commit in one statement (the caller pipelines it with BEGIN, the
-- locks and COMMIT, so a flush costs two round trips): claim each event's (source, message_id)
-- in the current dedup generation, write each event never seen before to the log once, wake
-- the routers. Returns the positions (1-based) of the events already seen and the new event
-- ids in input order.
--
-- Inputs are strings split in SQL: binding arrays of thousands of strings costs more in the
-- driver than everything else. Text fields are joined by the unit separator, which valid JSON
-- never contains and ingest refuses in ids. An event's named destinations are ';'-joined
-- ('' for none: every connection), events ','-joined. Traceparents (lowercase hex and '-')
-- are ','-joined, '' for an event without one; the whole list is '' when no event has one
-- (an empty array, which unnest pads with NULLs).
--
-- Claiming: a pair claimed by a concurrent transaction makes ON CONFLICT wait for it: if it
-- commits the pair is a duplicate here, if it rolls back the pair is ours. Older generations
-- are only read (the outer query cannot see the rows this statement inserts); the claim
-- returns the generation it wrote, and the probe of the others compares against it, so
-- Postgres prunes the current generation's partition from that probe.
--
-- Ordering: event ids are drawn from the sequence in input order (nextval over a sorted
-- subquery), so a batch's events keep their order.
--
-- One NOTIFY per transaction (it takes a global lock at commit), sent even if every event
-- turns out a duplicate: a spurious wake-up costs one empty read.
WITH event AS (
    SELECT e.position, e.message_id, e.source_key::integer AS source_key,
           e.tenant_key::integer AS tenant_key, e.partition::smallint AS partition,
           e.user_id, e.document, e.destinations, nullif(e.traceparent, '') AS traceparent
    FROM unnest(string_to_array(%(message_ids)s, E'\x1f'),
                string_to_array(%(source_keys)s, ','),
                string_to_array(%(tenant_keys)s, ','),
                string_to_array(%(partitions)s, ','),
                string_to_array(%(user_ids)s, E'\x1f'),
                string_to_array(%(documents)s, E'\x1f'),
                string_to_array(%(destinations)s, ','),
                string_to_array(%(traceparents)s, ','))
         WITH ORDINALITY AS e(message_id, source_key, tenant_key, partition, user_id, document,
                              destinations, traceparent, position)
),
claimed AS (
    INSERT INTO dedup_keys (source_key, message_id, generation)
    SELECT e.source_key, e.message_id, (SELECT max(generation) FROM dedup_generations)
    FROM event e
    ORDER BY e.source_key, e.message_id
    ON CONFLICT DO NOTHING
    RETURNING source_key, message_id, generation
),
fresh AS (
    SELECT e.*
    FROM event e
    JOIN claimed c ON c.source_key = e.source_key AND c.message_id = e.message_id
    WHERE NOT EXISTS (
        SELECT 1 FROM dedup_keys d
        WHERE d.source_key = e.source_key
          AND d.message_id = e.message_id
          AND d.generation < c.generation
    )
),
numbered AS (
    SELECT nextval('events_event_id_seq') AS event_id, ordered.*
    FROM (SELECT * FROM fresh ORDER BY position) ordered
),
inserted AS (
    INSERT INTO events (event_id, source_key, tenant_key, ordering_partition, user_id,
                        message_id, destinations, document, traceparent)
    SELECT event_id, source_key, tenant_key, partition, user_id, message_id,
           nullif(string_to_array(destinations, ';'), '{}')::integer[], document, traceparent
    FROM numbered
)
SELECT
    (SELECT coalesce(string_agg(position::text, ','), '')
     FROM event WHERE position NOT IN (SELECT position FROM fresh)) AS duplicates,
    (SELECT coalesce(string_agg(event_id::text, ',' ORDER BY position), '')
     FROM numbered) AS event_ids,
    pg_notify('relayq_events', %(notify)s) AS notified;

-- name: parse_documents
-- Parses event documents as jsonb and stores nothing: ingest checks documents itself, and a
-- group commit Postgres refused anyway asks it, half by half, which documents it refuses
-- (operators' payload filters read documents as jsonb, so the log must hold only such).
SELECT count(d::jsonb) FROM unnest(string_to_array(%(documents)s, E'\x1f')) AS d;
