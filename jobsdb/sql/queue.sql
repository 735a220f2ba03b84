-- The row path of delivery: what a router reads of the jobs that have rows (failed, waiting,
-- released, retried by an operator), how it parks and releases them, what it records.
-- Jobs that went well have no row: routers read them from the event log (eventlog.sql).
--
-- The ordering barrier lives in these rows, not in router memory: the earliest failed or
-- waiting job of a (destination, user) holds every later job of that key. So the barrier
-- survives restarts, moves with partitions between routers, and stays right when operators
-- retry or abort jobs. A user with an unfinished row has their events read from the log
-- parked behind it (eventlog.sql `park`).

-- name: pickup
-- Runnable jobs of each wanted destination in job order, up to that destination's limit:
-- pending jobs, and failed jobs whose retry time has come (found by retry time, so jobs still
-- backing off are never read). Only the caller's ordering partitions (NULL: all), minus the
-- jobs it already holds in memory. One statement serves many destinations: with thousands of
-- destinations that each have a few jobs, a statement per destination costs more than the
-- jobs (measured: 10,000 destinations, 3 jobs a read).
--
-- held_by: the job that holds this one (job_holder(), the barrier's one definition, in
-- migrations/0007_barrier.sql). The caller must not deliver a held job; unless it has the
-- holder in memory, it parks it (see `hold`) so that it leaves these indexes and is not read
-- again until the holder is resolved.
--
-- The exclusion is one list for every destination (job ids are unique), a NOT IN over an
-- uncorrelated subquery: hashed once per execution, where `<> ALL(array)` compares every row
-- with every held id once the statement is prepared (a lane holds up to thousands: measured
-- 26 ms against 8 ms a read). The ids come comma-separated: a string is dumped at once, an
-- array element by element.
WITH wanted AS (
    SELECT *
    FROM unnest(%(destination_keys)s::integer[], %(limits)s::integer[])
         AS w(destination_key, lim)
),
chosen AS (
    SELECT c.*
    FROM wanted w
    CROSS JOIN LATERAL (
        SELECT u.*
        FROM ((SELECT job_id, destination_key, user_id, message_id, state, attempts,
                      first_attempt_at, created_at, ordering_partition
               FROM jobs
               WHERE destination_key = w.destination_key
                 AND state = 'pending'
                 AND (%(partitions)s::smallint[] IS NULL
                      OR ordering_partition = ANY(%(partitions)s::smallint[]))
                 AND job_id NOT IN (SELECT unnest(string_to_array(%(exclude)s::text, ',')::bigint[]))
               ORDER BY job_id
               LIMIT w.lim)
              UNION ALL
              (SELECT job_id, destination_key, user_id, message_id, state, attempts,
                      first_attempt_at, created_at, ordering_partition
               FROM jobs
               WHERE destination_key = w.destination_key
                 AND state = 'failed'
                 AND retry_at <= now()
                 AND (%(partitions)s::smallint[] IS NULL
                      OR ordering_partition = ANY(%(partitions)s::smallint[]))
                 AND job_id NOT IN (SELECT unnest(string_to_array(%(exclude)s::text, ',')::bigint[]))
               ORDER BY retry_at
               LIMIT w.lim)) u
        ORDER BY u.job_id
        LIMIT w.lim
    ) c
)
SELECT c.destination_key, c.job_id, c.user_id, c.message_id, c.state::text AS state,
       c.attempts, c.first_attempt_at, c.created_at, e.document AS payload,
       c.ordering_partition, held.holder AS held_by, e.traceparent
FROM chosen c
-- The document and traceparent are the event's, in the log (the job id's high bits are the
-- event id).
JOIN events e ON e.event_id = c.job_id >> 16
LEFT JOIN LATERAL job_holder(c.destination_key, c.user_id, c.job_id) held ON true
ORDER BY c.destination_key, c.job_id;

-- name: hold
-- Park jobs behind their root blocker (state waiting, blocked_by). Only behind a blocker that
-- is still unfinished, whose row this statement share-locks: an operator aborting it must
-- update that row, so the abort waits for this transaction to end and its release (a later
-- statement) then sees these jobs waiting. A blocker that finished in the meantime parks
-- nothing; the job stays runnable and is read again. Fenced like record_outcomes.
WITH leased AS (
    SELECT partition
    FROM router_leases
    WHERE owner = %(owner)s
    FOR KEY SHARE
),
wanted AS (
    SELECT job_id, blocker
    FROM unnest(%(job_ids)s::bigint[], %(blockers)s::bigint[]) AS w(job_id, blocker)
),
live AS (
    SELECT b.job_id, b.blocked_by
    FROM jobs b
    WHERE b.job_id IN (SELECT blocker FROM wanted)
      AND b.state IN ('pending', 'failed', 'waiting')
    ORDER BY b.job_id
    FOR SHARE
)
UPDATE jobs j
SET state = 'waiting', blocked_by = w.blocker, retry_at = NULL, updated_at = now()
FROM wanted w
JOIN live ON live.job_id = w.blocker
WHERE j.job_id = w.job_id
  AND j.state IN ('pending', 'failed')
  -- Never a cycle: not behind itself, nor behind a job that waits for this one.
  AND w.blocker <> j.job_id
  AND live.blocked_by IS DISTINCT FROM j.job_id
  AND (%(owner)s::text IS NULL OR j.ordering_partition IN (SELECT partition FROM leased))
RETURNING j.job_id;

-- name: record_outcomes
-- One statement for a batch of delivery attempts: move each job to its new state if it is
-- still runnable (an operator may have aborted it meanwhile; then the state stays, but the
-- attempt is still logged), append every attempt to job_statuses, and release the jobs
-- waiting behind each job that ended (succeeded or aborted), and count them for GetStats.
--
-- Successes, nearly every attempt, come as four comma-separated lists of numbers (job ids,
-- attempts, start times as epoch seconds, durations): the driver dumps a string at once, but
-- an array element by element, and that was most of the router's cost of a flush. Failures
-- and aborts, which carry errors, responses and retry times, come as arrays.
--
-- Fencing: a job moves only if its partition's lease is still owned by this router (`owner`;
-- NULL for callers outside a router), expired or not, and the attempt is later than any
-- recorded. A lease that ran out while nobody took it (Postgres unreachable for longer than
-- the lease) is still this router's: what it delivered is recorded, not delivered again. A
-- router whose partition another router took meanwhile may still finish deliveries it had
-- started; their attempts are logged but change nothing, and the partition's new owner
-- delivers those jobs again. The lease rows are locked FOR KEY SHARE until this commits:
-- enough to make another router's acquire (FOR UPDATE SKIP LOCKED) pass them by, so the owner
-- cannot change under this write, while this router's own renewals and releases (updates of
-- non-key columns) go on; FOR SHARE would queue a renewal behind every flush in flight, and
-- with flushes overlapping it might never get through. A write retried after a commit that
-- did in fact happen moves nothing twice. (docs/design.md, Fencing.)
WITH leased AS (
    SELECT partition
    FROM router_leases
    WHERE owner = %(owner)s
    FOR KEY SHARE
),
outcome AS (
    SELECT o.job_id, o.attempt, 'succeeded'::job_state AS state, NULL::text AS error_code,
           NULL::text AS response, to_timestamp(o.started_epoch) AS started_at, o.duration_ms,
           NULL::timestamptz AS retry_at, NULL::text AS reason, nullif(o.batch, '') AS batch
    FROM unnest(string_to_array(%(ok_job_ids)s::text, ',')::bigint[],
                string_to_array(%(ok_attempts)s::text, ',')::integer[],
                string_to_array(%(ok_started_at)s::text, ',')::float8[],
                string_to_array(%(ok_durations_ms)s::text, ',')::integer[],
                string_to_array(%(ok_batches)s::text, ','))
        AS o(job_id, attempt, started_epoch, duration_ms, batch)
    UNION ALL
    SELECT *
    FROM unnest(%(job_ids)s::bigint[], %(attempts)s::integer[], %(states)s::job_state[],
                %(error_codes)s::text[], %(responses)s::text[], %(started_at)s::timestamptz[],
                %(durations_ms)s::integer[], %(retry_at)s::timestamptz[], %(reasons)s::text[],
                %(batches)s::text[])
        AS o(job_id, attempt, state, error_code, response, started_at, duration_ms, retry_at,
             reason, batch)
),
moved AS (
    UPDATE jobs j
    SET state = o.state,
        attempts = o.attempt,
        retry_at = o.retry_at,
        error_code = o.error_code,
        first_attempt_at = coalesce(j.first_attempt_at, o.started_at),
        updated_at = now()
    FROM outcome o
    WHERE j.job_id = o.job_id
      -- The same ids again as an array, so that the jobs are found by primary key whatever
      -- the statistics say (a hash join would scan every job of the partition).
      AND j.job_id = ANY(string_to_array(%(ok_job_ids)s::text, ',')::bigint[]
                         || %(job_ids)s::bigint[])
      AND j.state IN ('pending', 'failed')
      AND j.attempts < o.attempt
      AND (%(owner)s::text IS NULL OR j.ordering_partition IN (SELECT partition FROM leased))
    RETURNING j.job_id, j.state, j.destination_key
),
counted AS (
    INSERT INTO delivery_counts AS c (destination_key, bucket, succeeded, failed, aborted)
    SELECT destination_key, to_timestamp(floor(extract(epoch FROM now()) / 10) * 10),
           count(*) FILTER (WHERE state = 'succeeded'),
           count(*) FILTER (WHERE state = 'failed'),
           count(*) FILTER (WHERE state = 'aborted')
    FROM moved
    GROUP BY destination_key
    -- Rows locked in one order by every writer: no deadlocks between routers.
    ORDER BY destination_key
    ON CONFLICT (destination_key, bucket) DO UPDATE
    SET succeeded = c.succeeded + excluded.succeeded,
        failed = c.failed + excluded.failed,
        aborted = c.aborted + excluded.aborted
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, error_code, response, started_at,
                              duration_ms, retry_at, actor, reason, batch)
    SELECT job_id, attempt, state, error_code, response, started_at, duration_ms, retry_at,
           %(actor)s, reason, batch
    FROM outcome
),
released AS (
    UPDATE jobs w
    SET state = 'pending', blocked_by = NULL, updated_at = now()
    WHERE w.state = 'waiting'
      -- One index scan per partition for the whole batch, not a probe per job and partition.
      AND w.blocked_by = ANY(ARRAY(SELECT job_id FROM moved
                                   WHERE state IN ('succeeded', 'aborted')))
    RETURNING w.job_id
)
SELECT (SELECT array_agg(job_id) FROM moved) AS moved,
       (SELECT count(*) FROM released) AS released;

-- name: release
-- Let the jobs waiting behind finished jobs run again (they are read back in job order).
-- For operators' aborts: run it as its own statement after the abort, in the same transaction.
UPDATE jobs
SET state = 'pending', blocked_by = NULL, updated_at = now()
WHERE state = 'waiting'
  AND blocked_by = ANY(%(job_ids)s::bigint[])
RETURNING job_id;

-- name: release_orphans
-- A safety net, run now and then: waiting jobs whose blocker has finished. Nothing should
-- create these (every path that ends a job releases its waiters), but if something ever
-- did, a job parked forever is the worst way to find out.
-- A blocker that is gone (its partition dropped or compacted away) had finished.
UPDATE jobs w
SET state = 'pending', blocked_by = NULL, updated_at = now()
WHERE w.state = 'waiting'
  AND (%(destination_key)s::integer IS NULL OR w.destination_key = %(destination_key)s)
  AND NOT EXISTS (SELECT 1 FROM jobs b
                  WHERE b.job_id = w.blocked_by AND b.state IN ('pending', 'failed', 'waiting'))
RETURNING w.job_id;

-- name: roots
-- For these (destination, user) pairs, the job their next events wait behind: the root of
-- the earliest unfinished row (none: the user is free). Asked after a flush that changed
-- rows of theirs, in its transaction, so the router's picture of who is held matches it.
-- One probe of jobs_held_idx per pair for its earliest unfinished row: a user with many
-- unfinished rows (a replay's, a backfill's) costs no more than one with a single row.
SELECT w.destination_key, w.user_id, r.root
FROM (SELECT DISTINCT destination_key, user_id
      FROM unnest(%(destination_keys)s::integer[], %(user_ids)s::text[])
           AS u(destination_key, user_id)) w
CROSS JOIN LATERAL (
    SELECT coalesce(j.blocked_by, j.job_id) AS root
    FROM jobs j
    WHERE j.destination_key = w.destination_key
      AND j.user_id = w.user_id
      AND j.state IN ('pending', 'failed', 'waiting')
    ORDER BY j.job_id
    LIMIT 1
) r;

-- name: destinations_with_pending
-- Destinations that have pending jobs, by a loose index scan of jobs_pending_idx: one probe per
-- destination with work, however many jobs wait. The routers' polling fallback; an idle cluster
-- answers it from an empty index.
WITH RECURSIVE found AS (
    (SELECT destination_key FROM jobs WHERE state = 'pending'
     ORDER BY destination_key LIMIT 1)
    UNION ALL
    SELECT (SELECT j.destination_key FROM jobs j
            WHERE j.state = 'pending' AND j.destination_key > found.destination_key
            ORDER BY j.destination_key LIMIT 1)
    FROM found
    WHERE found.destination_key IS NOT NULL
)
SELECT destination_key FROM found WHERE destination_key IS NOT NULL;

-- name: earliest_retries
-- Each destination's earliest retry time among its failed jobs, by a loose index scan of
-- jobs_failed_idx (the first entry per destination is its earliest).
WITH RECURSIVE found AS (
    (SELECT destination_key, retry_at FROM jobs WHERE state = 'failed'
     ORDER BY destination_key, retry_at LIMIT 1)
    UNION ALL
    SELECT next.destination_key, next.retry_at
    FROM found
    CROSS JOIN LATERAL (
        SELECT j.destination_key, j.retry_at FROM jobs j
        WHERE j.state = 'failed' AND j.destination_key > found.destination_key
        ORDER BY j.destination_key, j.retry_at LIMIT 1
    ) next
)
SELECT destination_key, retry_at FROM found;
