-- Jobs as operators see them: list, one job with its history, peek, retry, abort, stats.
--
-- Queries with a `{where}` slot take an operator's filter, compiled by jobsdb.filters to SQL
-- built only from fixed fragments with every value a parameter; their parameters are therefore
-- positional (%s), in the order the slots appear. Every query is limited to %s tenant scope
-- (NULL: the operator, everything).

-- name: list
-- Keyset pagination in job order: a page starts after the last job_id of the previous one, so
-- pages stay stable while jobs are inserted (new ids are larger) and delivered (a job that
-- changes state is either on its page or not; no other job moves between pages).
SELECT j.job_id, t.id, s.id, d.id, j.user_id, j.message_id, j.state::text, j.attempts,
       j.retry_at, j.blocked_by, j.error_code, j.created_at, j.updated_at, j.first_attempt_at,
       CASE WHEN %s THEN j.payload::text END
FROM jobs j
JOIN tenants t ON t.tenant_key = j.tenant_key
JOIN sources s ON s.source_key = j.source_key
JOIN destinations d ON d.destination_key = j.destination_key
WHERE j.job_id > %s
  AND (%s::integer IS NULL OR j.tenant_key = %s)
  AND ({where})
ORDER BY j.job_id
LIMIT %s;

-- name: get
SELECT j.job_id, t.id, s.id, d.id, j.user_id, j.message_id, j.state::text, j.attempts,
       j.retry_at, j.blocked_by, j.error_code, j.created_at, j.updated_at, j.first_attempt_at,
       j.payload::text
FROM jobs j
JOIN tenants t ON t.tenant_key = j.tenant_key
JOIN sources s ON s.source_key = j.source_key
JOIN destinations d ON d.destination_key = j.destination_key
WHERE j.job_id = %(job_id)s
  AND (%(scope)s::integer IS NULL OR j.tenant_key = %(scope)s);

-- name: history
-- Every attempt and operator action, oldest first.
SELECT attempt, state::text, error_code, response, started_at, duration_ms, retry_at, actor,
       reason, batch
FROM job_statuses
WHERE job_id = %(job_id)s
ORDER BY recorded_at, attempt;

-- name: peek
-- The destination's unfinished jobs in job order, the way the router's pickup sees them
-- (jobsdb/sql/queue.sql): each with the job that holds it (a waiting job's blocker, or for a
-- pending or failed job job_holder(), the barrier rule both share).
-- Pending jobs come from jobs_pending_idx in job order; failed and waiting ones are few.
WITH unfinished AS (
    (SELECT job_id FROM jobs
     WHERE destination_key = %(destination_key)s AND state = 'pending'
     ORDER BY job_id LIMIT %(limit)s)
    UNION ALL
    (SELECT job_id FROM jobs
     WHERE destination_key = %(destination_key)s AND state IN ('failed', 'waiting')
     ORDER BY job_id LIMIT %(limit)s)
),
chosen AS (
    SELECT job_id FROM unfinished ORDER BY job_id LIMIT %(limit)s
)
SELECT j.job_id, t.id, s.id, d.id, j.user_id, j.message_id, j.state::text, j.attempts,
       j.retry_at, j.blocked_by, j.error_code, j.created_at, j.updated_at, j.first_attempt_at,
       NULL::text,
       CASE WHEN j.state = 'waiting' THEN j.blocked_by ELSE held.holder END
FROM chosen c
JOIN jobs j ON j.job_id = c.job_id
JOIN tenants t ON t.tenant_key = j.tenant_key
JOIN sources s ON s.source_key = j.source_key
JOIN destinations d ON d.destination_key = j.destination_key
LEFT JOIN LATERAL job_holder(j.destination_key, j.user_id, j.job_id) held
    ON j.state <> 'waiting'
ORDER BY j.job_id;

-- name: retry
-- Force a retry now. A failed job's retry time becomes now. An aborted job (or, when the
-- replay parameter is true, a succeeded one) becomes failed and due now, rather than
-- pending: as a failed job it is again the barrier of its user, so the user's jobs not yet
-- delivered wait behind it (pickup parks them) and order holds. A waiting job whose blocker
-- already ended (nothing should leave one, but an operator can fix it) goes back to pending.
--
-- One statement counts what the selection matches and, unless the apply parameter is false
-- (a dry run), changes it. The update is a compare-and-set on the state each job was matched
-- in: a router that changed a job meanwhile wins and this statement skips it, so nothing is
-- lost or changed twice. Parameters: scope, scope, the filter's, replay, apply, actor, reason.
WITH target AS (
    SELECT j.job_id, j.state
    FROM jobs j
    WHERE (%s::integer IS NULL OR j.tenant_key = %s)
      AND ({where})
      AND (j.state IN ('failed', 'aborted')
           OR (j.state = 'succeeded' AND %s)
           OR (j.state = 'waiting'
               AND NOT EXISTS (SELECT 1 FROM jobs b
                               WHERE b.job_id = j.blocked_by
                                 AND b.state IN ('pending', 'failed', 'waiting'))))
),
changed AS (
    UPDATE jobs j
    SET state = CASE WHEN j.state = 'waiting' THEN 'pending' ELSE 'failed' END::job_state,
        retry_at = CASE WHEN j.state = 'waiting' THEN NULL ELSE now() END,
        blocked_by = NULL,
        updated_at = now()
    FROM target
    WHERE %s
      AND j.job_id = target.job_id
      AND j.state = target.state
    RETURNING j.job_id, j.attempts, j.state, j.destination_key
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, started_at, actor, reason)
    SELECT job_id, attempts, state, now(), %s, %s
    FROM changed
)
SELECT (SELECT count(*) FROM target),
       coalesce(array_agg(job_id), ARRAY[]::bigint[]),
       coalesce(string_agg(DISTINCT destination_key::text, ','), '')
FROM changed;

-- name: abort
-- Give up on unfinished jobs: count what the selection matches and, unless apply is false,
-- abort it, compare-and-set as in `retry`. The jobs waiting behind them are released by a
-- separate statement (queue.sql `release`) in the same transaction: a router parking jobs
-- behind one of these holds a share lock on it, so this UPDATE waits for that to commit, and
-- the release, with a newer snapshot, then sees those parked jobs too.
-- Parameters: scope, scope, the filter's, apply, actor, reason.
WITH target AS (
    SELECT j.job_id, j.state
    FROM jobs j
    WHERE (%s::integer IS NULL OR j.tenant_key = %s)
      AND ({where})
      AND j.state IN ('pending', 'failed', 'waiting')
),
changed AS (
    UPDATE jobs j
    SET state = 'aborted', retry_at = NULL, blocked_by = NULL, updated_at = now()
    FROM target
    WHERE %s
      AND j.job_id = target.job_id
      AND j.state = target.state
    RETURNING j.job_id, j.attempts, j.destination_key
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, started_at, actor, reason)
    SELECT job_id, attempts, 'aborted', now(), %s, %s
    FROM changed
),
counted AS (
    INSERT INTO delivery_counts AS c (destination_key, bucket, aborted)
    SELECT destination_key, to_timestamp(floor(extract(epoch FROM now()) / 10) * 10), count(*)
    FROM changed
    GROUP BY destination_key
    ORDER BY destination_key
    ON CONFLICT (destination_key, bucket) DO UPDATE SET aborted = c.aborted + excluded.aborted
)
SELECT (SELECT count(*) FROM target),
       coalesce(array_agg(job_id), ARRAY[]::bigint[]),
       coalesce(string_agg(DISTINCT destination_key::text, ','), '')
FROM changed;

-- name: notify
-- Wake the routers of these destinations (and, with 'relayq_reorder', make them re-read what
-- they hold of them, because an operator put an old job back in front of newer ones).
SELECT pg_notify(%(channel)s, %(destinations)s);

-- name: stats
-- Per destination: unfinished jobs counted from their partial indexes, the oldest pending job
-- (the first entry of jobs_pending_idx), and delivery counts and recent rates from
-- delivery_counts. Never a scan of finished jobs.
SELECT d.destination_key, d.id, t.id, d.paused,
       coalesce(u.pending, 0)::bigint, coalesce(u.failed, 0)::bigint,
       coalesce(u.waiting, 0)::bigint, coalesce(c.succeeded, 0)::bigint,
       coalesce(c.aborted, 0)::bigint,
       extract(epoch FROM now() - oldest.created_at)::float8,
       coalesce(c.recent_succeeded, 0)::bigint, coalesce(c.recent_failed, 0)::bigint,
       d.circuit_opened_at, d.circuit_reason
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key
LEFT JOIN (
    -- One count per partial index (pending; failed; waiting), each an index scan of only
    -- the jobs in that state; a single scan over the three states would read the table.
    -- A tenant is narrowed by its destinations, which the indexes lead with (tenant_key is
    -- in no index: filtering on it would visit every pending row in the heap).
    SELECT destination_key, sum(pending) AS pending, sum(failed) AS failed,
           sum(waiting) AS waiting
    FROM (
        SELECT destination_key, count(*) AS pending, 0 AS failed, 0 AS waiting
        FROM jobs
        WHERE state = 'pending'
          AND (%(destination_key)s::integer IS NULL OR destination_key = %(destination_key)s)
          AND (%(tenant_key)s::integer IS NULL OR destination_key IN (
                   SELECT destination_key FROM destinations WHERE tenant_key = %(tenant_key)s))
        GROUP BY destination_key
        UNION ALL
        SELECT destination_key, 0, count(*), 0
        FROM jobs
        WHERE state = 'failed'
          AND (%(destination_key)s::integer IS NULL OR destination_key = %(destination_key)s)
          AND (%(tenant_key)s::integer IS NULL OR destination_key IN (
                   SELECT destination_key FROM destinations WHERE tenant_key = %(tenant_key)s))
        GROUP BY destination_key
        UNION ALL
        SELECT destination_key, 0, 0, count(*)
        FROM jobs
        WHERE state = 'waiting'
          AND (%(destination_key)s::integer IS NULL OR destination_key = %(destination_key)s)
          AND (%(tenant_key)s::integer IS NULL OR destination_key IN (
                   SELECT destination_key FROM destinations WHERE tenant_key = %(tenant_key)s))
        GROUP BY destination_key
    ) per_state
    GROUP BY destination_key
) u ON u.destination_key = d.destination_key
LEFT JOIN (
    SELECT destination_key,
           sum(succeeded) AS succeeded,
           sum(aborted) AS aborted,
           sum(succeeded) FILTER (WHERE bucket >= now() - interval '60 seconds')
               AS recent_succeeded,
           sum(failed) FILTER (WHERE bucket >= now() - interval '60 seconds') AS recent_failed
    FROM delivery_counts
    GROUP BY destination_key
) c ON c.destination_key = d.destination_key
LEFT JOIN LATERAL (
    SELECT j.created_at FROM jobs j
    WHERE j.destination_key = d.destination_key AND j.state = 'pending'
    ORDER BY j.job_id
    LIMIT 1
) oldest ON true
WHERE (%(destination_key)s::integer IS NULL OR d.destination_key = %(destination_key)s)
  AND (%(tenant_key)s::integer IS NULL OR d.tenant_key = %(tenant_key)s)
ORDER BY t.id, d.id;

-- name: connection_stats
-- Per connection that has a filter, or whose filter kept events out before it was cleared:
-- the events kept out, in all and over the last minute, from connection_counts (a few dozen
-- rows per connection; see jobsdb/migrations/0008_connection_filters.sql).
SELECT s.id AS source_id, d.id AS destination_id, d.destination_key, t.id AS tenant_id,
       coalesce(c.event_filter, '') AS filter,
       coalesce(n.filtered, 0)::bigint AS filtered_out,
       coalesce(n.recent, 0)::bigint AS recent_filtered_out
FROM connections c
JOIN sources s ON s.source_key = c.source_key
JOIN destinations d ON d.destination_key = c.destination_key
JOIN tenants t ON t.tenant_key = d.tenant_key
LEFT JOIN (
    SELECT source_key, destination_key, sum(filtered) AS filtered,
           sum(filtered) FILTER (WHERE bucket >= now() - interval '60 seconds') AS recent
    FROM connection_counts
    WHERE (%(destination_key)s::integer IS NULL OR destination_key = %(destination_key)s)
    GROUP BY source_key, destination_key
) n ON n.source_key = c.source_key AND n.destination_key = c.destination_key
WHERE (c.event_filter IS NOT NULL OR n.filtered > 0)
  AND (%(destination_key)s::integer IS NULL OR c.destination_key = %(destination_key)s)
  AND (%(tenant_key)s::integer IS NULL OR d.tenant_key = %(tenant_key)s)
ORDER BY s.id, d.id;

-- name: fold_connection_counts
-- Maintenance: as fold_counts, for connection_counts: buckets older than ten minutes, of
-- every backend, into one ('-infinity', backend 0) row per connection. Ingest only ever
-- writes the current bucket, so this never waits for it.
WITH old AS (
    DELETE FROM connection_counts
    WHERE bucket < now() - interval '10 minutes'
      AND bucket <> '-infinity'
    RETURNING source_key, destination_key, filtered
)
INSERT INTO connection_counts AS c (source_key, destination_key, bucket, backend, filtered)
SELECT source_key, destination_key, '-infinity', 0, sum(filtered)
FROM old
GROUP BY source_key, destination_key
ON CONFLICT (source_key, destination_key, bucket, backend) DO UPDATE
SET filtered = c.filtered + excluded.filtered;

-- name: fold_counts
-- Maintenance: fold delivery_counts buckets older than ten minutes into each destination's
-- '-infinity' row, keeping the table a few dozen rows per destination.
WITH old AS (
    DELETE FROM delivery_counts
    WHERE bucket < now() - interval '10 minutes'
      AND bucket <> '-infinity'
    RETURNING destination_key, succeeded, failed, aborted
)
INSERT INTO delivery_counts AS c (destination_key, bucket, succeeded, failed, aborted)
SELECT destination_key, '-infinity', sum(succeeded), sum(failed), sum(aborted)
FROM old
GROUP BY destination_key
ORDER BY destination_key
ON CONFLICT (destination_key, bucket) DO UPDATE
SET succeeded = c.succeeded + excluded.succeeded,
    failed = c.failed + excluded.failed,
    aborted = c.aborted + excluded.aborted;
