-- name: lock_generations
-- Taken first in every ingest transaction, as a statement of its own: the shared lock keeps
-- dedup rotation out until commit, and the next statement takes its snapshot after the lock is
-- granted, so it sees the current generation. (Reading the generation in this same statement
-- would use a snapshot older than the lock, possibly from before a rotation just committed.)
SELECT pg_advisory_xact_lock_shared(%(lock)s);

-- name: store_events
-- The whole write of a group commit in one statement (the caller pipelines it with BEGIN, the
-- lock and COMMIT, so a flush costs two round trips, not seven): claim each event's
-- (source, message_id) in the current dedup generation, insert one job per destination for the
-- events never seen before, count per connection the new events its filter kept out, wake the
-- routers. Returns the positions (1-based) of the events already seen and the new job ids in
-- input order.
--
-- Inputs are strings split in SQL: binding arrays of thousands of strings costs more in the
-- driver than everything else. Text fields are joined by the unit separator, which valid JSON
-- never contains and ingest refuses in ids. Each event carries its own destinations and their
-- ordering partitions (';' within an event, ',' between events), so jobs come from the event
-- row itself rather than from a list of jobs joined back to the events.
--
-- Claiming: a pair claimed by a concurrent transaction makes ON CONFLICT wait for it: if it
-- commits the pair is a duplicate here, if it rolls back the pair is ours. Older generations
-- are only read (the outer query cannot see the rows this statement inserts); the claim
-- returns the generation it wrote, and the probe of the others compares against it, so
-- Postgres prunes the current generation's partition from that probe (measured: with one
-- generation, as after a fresh install, an index probe per event less).
--
-- Ordering: job ids are drawn from the sequence in input order (nextval over a sorted
-- subquery), so a batch's events keep their order for every destination.
--
-- One NOTIFY per transaction (it takes a global lock at commit), sent even if every event
-- turns out a duplicate: a spurious wake-up costs one empty read.
WITH event AS (
    SELECT e.position, e.message_id, e.source_key::integer AS source_key,
           e.tenant_key::integer AS tenant_key, e.user_id, e.document, e.destinations,
           e.partitions
    FROM unnest(string_to_array(%(message_ids)s, E'\x1f'),
                string_to_array(%(source_keys)s, ','),
                string_to_array(%(tenant_keys)s, ','),
                string_to_array(%(user_ids)s, E'\x1f'),
                string_to_array(%(documents)s, E'\x1f'),
                string_to_array(%(destinations)s, ','),
                string_to_array(%(partitions)s, ','))
         WITH ORDINALITY AS e(message_id, source_key, tenant_key, user_id, document,
                              destinations, partitions, position)
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
    SELECT e.position, e.message_id, e.source_key, e.tenant_key, e.user_id, e.document,
           e.destinations, e.partitions
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
    SELECT nextval('jobs_job_id_seq') AS job_id, ordered.*
    FROM (
        SELECT position, ordinal, destination_key::integer AS destination_key,
               partition::smallint AS partition, tenant_key, source_key, user_id, message_id,
               document
        FROM (
            -- Set-returning functions in the select list run in step, a row at a time: a
            -- lateral unnest per event would build a tuplestore per event instead.
            SELECT f.position, f.tenant_key, f.source_key, f.user_id, f.message_id,
                   f.document,
                   unnest(string_to_array(f.destinations, ';')) AS destination_key,
                   unnest(string_to_array(f.partitions, ';')) AS partition,
                   generate_series(1, cardinality(string_to_array(f.destinations, ';')))
                       AS ordinal
            FROM fresh f
        ) per_job
        ORDER BY position, ordinal
    ) ordered
),
inserted AS (
    INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition,
                      user_id, message_id, payload)
    SELECT job_id, destination_key, tenant_key, source_key, partition, user_id, message_id,
           document::jsonb
    FROM numbered
),
filtered AS (
    -- Events some filters kept out, each with the number of its set of such destinations:
    -- %(sets)s is 'key;key|key;key;key', set n being its n-th part. The one-time filter skips
    -- the whole count when no event of the flush was kept out anywhere (the usual case).
    SELECT f.position::bigint AS position, f.kept_out::integer AS kept_out
    FROM unnest(string_to_array(%(filtered_events)s, ','),
                string_to_array(%(filtered_sets)s, ','))
         AS f(position, kept_out)
    WHERE %(filtered_events)s <> ''
),
-- Rows keyed by this backend (see jobsdb/migrations/0008_connection_filters.sql): no other
-- transaction writes them, so this never waits for a concurrent flush.
counted AS (
    INSERT INTO connection_counts AS c (source_key, destination_key, bucket, backend, filtered)
    SELECT per_set.source_key, d.destination_key::integer,
           to_timestamp(floor(extract(epoch FROM now()) / 10) * 10), pg_backend_pid(),
           sum(per_set.events)
    FROM (
        SELECT e.source_key, f.kept_out, count(*) AS events
        FROM filtered f
        JOIN fresh e USING (position)
        GROUP BY e.source_key, f.kept_out
    ) per_set
    CROSS JOIN LATERAL unnest(string_to_array(
        split_part(%(sets)s, '|', per_set.kept_out), ';')) AS d(destination_key)
    -- Two sets may share a destination: one row per connection, as ON CONFLICT requires.
    GROUP BY per_set.source_key, d.destination_key
    ON CONFLICT (source_key, destination_key, bucket, backend) DO UPDATE
    SET filtered = c.filtered + excluded.filtered
)
SELECT
    (SELECT coalesce(string_agg(position::text, ','), '')
     FROM event WHERE position NOT IN (SELECT position FROM fresh)) AS duplicates,
    (SELECT coalesce(string_agg(job_id::text, ',' ORDER BY position, ordinal), '')
     FROM numbered) AS job_ids,
    pg_notify('relayq_jobs', %(notify)s);

-- name: parse_documents
-- Parses event documents as store_events does (jsonb) and stores nothing: a group commit that
-- Postgres refused asks it, half by half, which documents it refused.
SELECT count(d::jsonb) FROM unnest(string_to_array(%(documents)s, E'\x1f')) AS d;
