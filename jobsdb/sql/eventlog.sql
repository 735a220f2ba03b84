-- The event log as routers read it, and what they write when they have delivered from it.
--
-- A router reads each ordering partition it leases in event id order, once for every
-- destination (`read`), and a destination that fell behind reads its own share (`read_for`).
-- It records success by moving cursors (`record_log`: the partition's frontier, or the
-- destination's own cursor) and one `deliveries` row per destination, and writes job rows
-- only for what must be remembered (a failed or aborted attempt, a job held behind its
-- user's). Everything it writes is fenced by its leases: by their owner, not their expiry.
-- Each write locks the lease rows still owned by the router (`owner = %(owner)s ... FOR KEY
-- SHARE`, or, in move_frontiers, by updating them) and writes only for those partitions. Another
-- router takes a partition only through acquire (leases.sql), whose FOR UPDATE SKIP LOCKED
-- passes by a row a writer holds; once its acquire has committed, the old owner's writes match
-- nothing, and the new owner reads the partition after that commit. So a lease that ran out
-- while nobody took it (Postgres unreachable for longer than the lease) still fences nothing
-- off: what its router delivered meanwhile is recorded once (docs/design.md, Fencing).

-- name: set_horizon
-- The first statement of a read's transaction: which ids are settled (migration 0012,
-- event_log_horizon), kept for the next statement, whose snapshot is taken after this ran.
-- The two go in one round trip (a pipeline).
SELECT set_config('relayq.horizon', event_log_horizon()::text, true)::bigint AS horizon;

-- name: read
-- Each wanted partition's events after `after`, below the horizon, in id order, up to
-- `lim` each: one index scan per partition (events_partition_idx). With the version of the
-- connections in this same snapshot (migration 0012): a router whose connections are older
-- reloads them before it hands these events out.
SELECT e.event_id, e.ordering_partition AS partition, e.source_key, e.tenant_key,
       e.created_at, e.user_id, e.message_id, e.destinations, e.document, e.traceparent,
       (SELECT version FROM relayq_config_version) AS config_version
FROM unnest(%(partitions)s::smallint[], %(afters)s::bigint[], %(limits)s::integer[])
     AS w(partition, after, lim)
CROSS JOIN LATERAL (
    SELECT *
    FROM events
    WHERE ordering_partition = w.partition
      AND event_id > w.after
      AND event_id < current_setting('relayq.horizon')::bigint
    ORDER BY event_id
    LIMIT w.lim
) e
ORDER BY e.ordering_partition, e.event_id;

-- name: read_for
-- A destination's own share of partitions it fell behind in: the events of its sources
-- that name it or no destination, in (after, upto], up to `lim` per (destination,
-- partition). `upto` is at most where the router's shared read has been, which is below the
-- horizon already. Sources travel as ';'-joined keys, one text per wanted row.
SELECT w.destination_key, e.event_id, e.ordering_partition AS partition, e.source_key,
       e.tenant_key, e.created_at, e.user_id, e.message_id, e.destinations, e.document,
       e.traceparent,
       (SELECT version FROM relayq_config_version) AS config_version
FROM unnest(%(destination_keys)s::integer[], %(partitions)s::smallint[],
            %(afters)s::bigint[], %(uptos)s::bigint[], %(limits)s::integer[],
            %(sources)s::text[])
     AS w(destination_key, partition, after, upto, lim, sources)
CROSS JOIN LATERAL (
    SELECT *
    FROM events
    WHERE ordering_partition = w.partition
      AND event_id > w.after
      AND event_id <= w.upto
      AND source_key = ANY(string_to_array(w.sources, ';')::integer[])
      AND (destinations IS NULL OR w.destination_key = ANY(destinations))
    ORDER BY event_id
    LIMIT w.lim
) e
ORDER BY w.destination_key, e.ordering_partition, e.event_id;

-- name: frontiers
-- Where reading starts in partitions a router has just taken.
SELECT partition, frontier FROM router_leases WHERE partition = ANY(%(partitions)s::smallint[]);

-- name: cursors
-- The destinations with a position of their own in these partitions.
SELECT destination_key, partition, position
FROM destination_cursors
WHERE partition = ANY(%(partitions)s::smallint[]);

-- name: blocked_users
-- Users with an unfinished job row at a destination, with the job their next events wait
-- behind (the root of the earliest such row): a router parks a user's events read from the
-- log behind it instead of delivering them ahead of it. jobs_held_idx has every unfinished row.
SELECT DISTINCT ON (destination_key, user_id)
       destination_key, user_id, coalesce(blocked_by, job_id) AS root
FROM jobs
WHERE state IN ('pending', 'failed', 'waiting')
  AND ordering_partition = ANY(%(partitions)s::smallint[])
  AND (%(destination_key)s::integer IS NULL OR destination_key = %(destination_key)s)
ORDER BY destination_key, user_id, job_id;

-- name: settled_above
-- Jobs above the cursors of these partitions that are settled already: they have a row (an
-- earlier owner's failure or parking, an operator's action) or a recorded delivery. An
-- earlier owner moved the frontier only as far as every destination had settled, so these
-- are what it did beyond; reading them again must not deliver them again. `low` is the
-- lowest cursor of the partitions, so both scans start near the head of the log.
WITH cursor AS (
    SELECT l.partition, l.frontier, c.destination_key, c.position
    FROM router_leases l
    LEFT JOIN destination_cursors c ON c.partition = l.partition
    WHERE l.partition = ANY(%(partitions)s::smallint[])
)
SELECT r.destination_key, r.job_id >> 16 AS event_id, r.ordering_partition AS partition
FROM jobs r
WHERE r.job_id > (%(low)s::bigint << 16)
  AND r.ordering_partition = ANY(%(partitions)s::smallint[])
  AND r.job_id >> 16 > coalesce(
      (SELECT position FROM cursor c
       WHERE c.partition = r.ordering_partition AND c.destination_key = r.destination_key),
      (SELECT frontier FROM cursor c WHERE c.partition = r.ordering_partition LIMIT 1))
UNION ALL
SELECT d.destination_key, x.event_id, x.partition
FROM deliveries d
CROSS JOIN LATERAL unnest(d.event_ids, d.partitions) AS x(event_id, partition)
WHERE box(point(d.destination_key, d.first_event_id), point(d.destination_key, d.last_event_id))
      && box(point(-1, %(low)s::bigint + 1), point(2147483648, 140737488355328))
  AND x.partition = ANY(%(partitions)s::smallint[])
  AND x.event_id > coalesce(
      (SELECT position FROM cursor c
       WHERE c.partition = x.partition AND c.destination_key = d.destination_key),
      (SELECT frontier FROM cursor c WHERE c.partition = x.partition LIMIT 1));

-- name: insert_rows
-- Job rows for jobs read from the log that failed or were aborted on their first attempt,
-- with that attempt's status: from now on the row path retries them (queue.sql). Fenced: only
-- jobs of partitions this router still owns (expired or not; see the top). Returns the jobs
-- written.
WITH leased AS (
    SELECT partition
    FROM router_leases
    WHERE owner = %(owner)s
    FOR KEY SHARE
),
row AS (
    SELECT *
    FROM unnest(%(job_ids)s::bigint[], %(destination_keys)s::integer[],
                %(tenant_keys)s::integer[], %(source_keys)s::integer[],
                %(partitions)s::smallint[], %(states)s::job_state[], %(retry_at)s::timestamptz[],
                %(started_at)s::timestamptz[], %(duration_ms)s::integer[],
                %(created_at)s::timestamptz[], %(user_ids)s::text[], %(message_ids)s::text[],
                %(error_codes)s::text[], %(responses)s::text[], %(reasons)s::text[],
                %(batches)s::text[])
         AS r(job_id, destination_key, tenant_key, source_key, partition, state, retry_at,
              started_at, duration_ms, created_at, user_id, message_id, error_code, response,
              reason, batch)
    WHERE r.partition IN (SELECT partition FROM leased)
),
inserted AS (
    INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition,
                      state, attempts, retry_at, first_attempt_at, created_at, user_id,
                      message_id, error_code)
    SELECT job_id, destination_key, tenant_key, source_key, partition, state, 1, retry_at,
           started_at, created_at, user_id, message_id, error_code
    FROM row
    -- Written already (a retried flush whose commit did happen): leave it as it is.
    ON CONFLICT (job_id) DO NOTHING
    RETURNING job_id
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, error_code, response, started_at,
                              duration_ms, retry_at, actor, reason, batch)
    SELECT job_id, 1, state, error_code, response, started_at, duration_ms, retry_at,
           %(actor)s, reason, batch
    FROM row
    WHERE job_id IN (SELECT job_id FROM inserted)
)
SELECT coalesce(array_agg(job_id), '{}') FROM inserted;

-- name: park
-- Jobs read from the log whose user has an unfinished row at the destination: written as
-- waiting behind that user's root job, found here (the root of the earliest unfinished row
-- before the job, after this transaction's earlier statements: a failure written by this
-- flush, waiters its record_outcomes released) and share-locked, as `hold` does (queue.sql):
-- an operator's abort of the root then waits for this and releases these too. A job whose
-- user has no unfinished row any more parks nothing: the caller delivers it instead.
-- Fenced like insert_rows. Returns the jobs parked.
WITH leased AS (
    SELECT partition
    FROM router_leases
    WHERE owner = %(owner)s
    FOR KEY SHARE
),
wanted AS (
    SELECT *
    FROM unnest(%(job_ids)s::bigint[], %(destination_keys)s::integer[],
                %(tenant_keys)s::integer[], %(source_keys)s::integer[],
                %(partitions)s::smallint[], %(created_at)s::timestamptz[],
                %(user_ids)s::text[], %(message_ids)s::text[])
         AS w(job_id, destination_key, tenant_key, source_key, partition, created_at,
              user_id, message_id)
    WHERE w.partition IN (SELECT partition FROM leased)
),
rooted AS (
    SELECT w.*, r.root
    FROM wanted w
    CROSS JOIN LATERAL (
        SELECT coalesce(h.blocked_by, h.job_id) AS root
        FROM jobs h
        WHERE h.destination_key = w.destination_key
          AND h.user_id = w.user_id
          AND h.state IN ('pending', 'failed', 'waiting')
          AND h.job_id < w.job_id
        ORDER BY h.job_id
        LIMIT 1
    ) r
),
live AS (
    SELECT b.job_id
    FROM jobs b
    WHERE b.job_id IN (SELECT root FROM rooted)
      AND b.state IN ('pending', 'failed', 'waiting')
    ORDER BY b.job_id
    FOR SHARE
)
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  blocked_by, created_at, user_id, message_id)
SELECT w.job_id, w.destination_key, w.tenant_key, w.source_key, w.partition, 'waiting',
       w.root, w.created_at, w.user_id, w.message_id
FROM rooted w
JOIN live ON live.job_id = w.root
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id;

-- name: leased
-- The partitions this router still owns (their leases expired or not: no other router has
-- taken them), their rows locked until commit (FOR KEY SHARE, as record_outcomes does) so that
-- no other router takes them while this writes.
SELECT partition
FROM router_leases
WHERE owner = %(owner)s
FOR KEY SHARE;

-- name: deliveries
-- One row per destination (and event partition) of what a flush delivered from the log,
-- each row's lists as ','-joined text; only the events of partitions still owned are kept.
-- Counted for GetStats as record_outcomes counts (delivery_counts).
WITH leased AS (
    SELECT partition
    FROM router_leases
    WHERE owner = %(owner)s
    FOR KEY SHARE
),
given AS (
    SELECT *
    FROM unnest(%(destination_keys)s::integer[], %(event_ids)s::text[],
                %(partitions)s::text[], %(requests)s::text[], %(started_at)s::text[],
                %(duration_ms)s::text[], %(status)s::text[], %(batch)s::text[])
         AS g(destination_key, event_ids, partitions, requests, started_at, duration_ms,
              status, batch)
),
kept AS (
    SELECT g.*, k.*
    FROM given g
    CROSS JOIN LATERAL (
        SELECT array_agg(x.event_id ORDER BY x.event_id) AS ids,
               array_agg(x.partition ORDER BY x.event_id) AS parts,
               array_agg(x.request ORDER BY x.event_id) AS reqs
        FROM unnest(string_to_array(g.event_ids, ',')::bigint[],
                    string_to_array(g.partitions, ',')::smallint[],
                    string_to_array(g.requests, ',')::integer[]) AS x(event_id, partition, request)
        WHERE x.partition IN (SELECT partition FROM leased)
    ) k
    WHERE k.ids IS NOT NULL
),
inserted AS (
    INSERT INTO deliveries (destination_key, first_event_id, last_event_id, actor, event_ids,
                            partitions, requests, started_at, duration_ms, status, batch)
    SELECT destination_key, ids[1], ids[cardinality(ids)], %(actor)s, ids, parts, reqs,
           ARRAY(SELECT to_timestamp(t::float8)
                 FROM unnest(string_to_array(started_at, ',')) WITH ORDINALITY AS s(t, n)
                 ORDER BY n),
           string_to_array(duration_ms, ',')::integer[],
           string_to_array(status, ','),
           string_to_array(batch, ',')
    FROM kept
    RETURNING destination_key, cardinality(event_ids) AS delivered
)
INSERT INTO delivery_counts AS c (destination_key, bucket, succeeded)
SELECT destination_key, to_timestamp(floor(extract(epoch FROM now()) / 10) * 10),
       sum(delivered)
FROM inserted
GROUP BY destination_key
-- Rows locked in one order by every writer: no deadlocks between routers.
ORDER BY destination_key
ON CONFLICT (destination_key, bucket) DO UPDATE SET succeeded = c.succeeded + excluded.succeeded;

-- name: count_outcomes
-- Failed and aborted first attempts of jobs read from the log, for GetStats.
INSERT INTO delivery_counts AS c (destination_key, bucket, failed, aborted)
SELECT destination_key, to_timestamp(floor(extract(epoch FROM now()) / 10) * 10),
       sum(failed), sum(aborted)
FROM unnest(%(destination_keys)s::integer[], %(failed)s::bigint[], %(aborted)s::bigint[])
     AS n(destination_key, failed, aborted)
GROUP BY destination_key
ORDER BY destination_key
ON CONFLICT (destination_key, bucket) DO UPDATE
SET failed = c.failed + excluded.failed, aborted = c.aborted + excluded.aborted;

-- name: count_filtered
-- Events connections' filters kept from their destinations, for GetStats: rows keyed by this
-- backend, as ingest wrote them before the event log (migration 0008), so concurrent writers
-- never wait for each other.
INSERT INTO connection_counts AS c (source_key, destination_key, bucket, backend, filtered)
SELECT source_key, destination_key, to_timestamp(floor(extract(epoch FROM now()) / 10) * 10),
       pg_backend_pid(), sum(filtered)
FROM unnest(%(source_keys)s::integer[], %(destination_keys)s::integer[],
            %(filtered)s::bigint[]) AS n(source_key, destination_key, filtered)
GROUP BY source_key, destination_key
ON CONFLICT (source_key, destination_key, bucket, backend) DO UPDATE
SET filtered = c.filtered + excluded.filtered;

-- name: move_frontiers
-- Where each partition is settled for every destination without a cursor of its own. Only
-- forward, and only by the partition's owner (its lease expired or not): a router whose
-- partition another has taken moves nothing. The update locks the row (FOR NO KEY UPDATE,
-- which an acquire's FOR UPDATE conflicts with, as with the others' FOR KEY SHARE).
UPDATE router_leases l
SET frontier = greatest(l.frontier, f.frontier)
FROM unnest(%(partitions)s::smallint[], %(frontiers)s::bigint[]) AS f(partition, frontier)
WHERE l.partition = f.partition
  AND l.owner = %(owner)s
RETURNING l.partition;

-- name: move_cursors
-- Destinations' own positions: set (a destination that fell behind, moving on) or dropped
-- (it caught up with the frontier, which covers it again). Fenced by the lease's owner.
WITH leased AS (
    SELECT partition
    FROM router_leases
    WHERE owner = %(owner)s
    FOR KEY SHARE
),
given AS (
    SELECT *
    FROM unnest(%(destination_keys)s::integer[], %(partitions)s::smallint[],
                %(positions)s::bigint[]) AS g(destination_key, partition, position)
    WHERE g.partition IN (SELECT partition FROM leased)
),
dropped AS (
    DELETE FROM destination_cursors c
    USING given g
    WHERE g.position IS NULL
      AND c.destination_key = g.destination_key
      AND c.partition = g.partition
)
INSERT INTO destination_cursors AS c (destination_key, partition, position)
SELECT destination_key, partition, position
FROM given
WHERE position IS NOT NULL
  -- A destination deleted meanwhile has no cursor to keep.
  AND destination_key IN (SELECT destination_key FROM destinations)
ORDER BY destination_key, partition
ON CONFLICT (destination_key, partition) DO UPDATE
SET position = excluded.position, updated_at = now();

-- name: oldest_retained
-- The oldest event from which the log is whole (migration 0016).
SELECT event_id, created_at FROM event_log_oldest_retained();

-- name: size
SELECT bytes, events FROM event_log_size();
