-- Jobs as operators see them: list, one job with its history, peek, retry, abort, stats.
--
-- A job is an (event, destination) pair. Most have no row: what became of them is told by
-- the cursors (jobsdb/sql/eventlog.sql). `view` is the one definition of every job's state,
-- which these queries select from as `j`:
--
-- - a job with a row (failed, waiting, aborted, retried, released) has the row's state;
-- - a job without one is an event of the log at a destination its source is connected to
--   (enabled), that names that destination or none, and that the connection's filter takes
--   (its filter now: a filter changed since applies to what it is asked about now); it is
--   `succeeded` at or below the destination's cursor in its partition (its own, or the
--   partition's frontier) and above it once its delivery is on record (the cursors follow
--   the deliveries a moment later), `pending` otherwise.
--
-- Queries with `{...}` slots are built by jobsdb.jobs from fixed fragments, every value a
-- parameter. Every parameter has a name, those of the fragments too (jobsdb.filters.Params:
-- f0, f1, ... for a filter, c0, c1, ... for the connections' filters, view_* for the view's
-- windows), so no statement depends on the order its values are given in. Every query is
-- limited to a tenant scope (NULL: the operator).

-- name: view
-- `{rows}` and `{log}` narrow each branch (an event id window, a destination; `false` leaves
-- a branch out); `{subscribed}` is the connections' filters over j.payload, by connection.
(SELECT r.job_id, r.destination_key, r.tenant_key, r.source_key, r.ordering_partition,
        r.user_id, r.message_id, r.state, r.attempts, r.retry_at, r.blocked_by, r.error_code,
        r.created_at, r.updated_at, r.first_attempt_at, e.document,
        e.document::jsonb AS payload, true AS has_row, e.traceparent
 FROM jobs r
 JOIN events e ON e.event_id = r.job_id >> 16
 WHERE {rows}
 UNION ALL
 SELECT j.*
 FROM (SELECT (e.event_id << 16) | c.slot AS job_id, c.destination_key, e.tenant_key,
              e.source_key, e.ordering_partition, e.user_id, e.message_id,
              CASE WHEN e.event_id > coalesce(dc.position, l.frontier)
                        AND NOT relayq_delivered(c.destination_key, e.event_id)
                   THEN 'pending' ELSE 'succeeded' END::job_state AS state,
              CASE WHEN e.event_id > coalesce(dc.position, l.frontier)
                        AND NOT relayq_delivered(c.destination_key, e.event_id)
                   THEN 0 ELSE 1 END AS attempts,
              NULL::timestamptz AS retry_at, NULL::bigint AS blocked_by, NULL::text AS error_code,
              e.created_at, e.created_at AS updated_at, NULL::timestamptz AS first_attempt_at,
              e.document, e.document::jsonb AS payload, false AS has_row, e.traceparent
       FROM events e
       JOIN connections c ON c.source_key = e.source_key AND c.enabled
                         AND (e.destinations IS NULL OR c.destination_key = ANY(e.destinations))
                         -- A backfill wrote rows for the events up to here (migration 0017).
                         AND e.event_id > coalesce(c.backfill_after, 0)
       JOIN router_leases l ON l.partition = e.ordering_partition
       LEFT JOIN destination_cursors dc ON dc.destination_key = c.destination_key
                                       AND dc.partition = e.ordering_partition
       WHERE {log}
         AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.job_id = (e.event_id << 16) | c.slot)
      ) j
 WHERE {subscribed})

-- name: subscriptions
-- The enabled connections that have a filter (the others take every event).
SELECT source_key, destination_key, event_filter
FROM connections
WHERE enabled AND event_filter IS NOT NULL
ORDER BY source_key, destination_key;

-- name: job_columns
-- The columns of a job as operators see it (jobsdb.jobs.JobRow, in its order) but its
-- payload, which each query chooses: from the job `j`, its tenant `t`, source `s` and
-- destination `d`. The queries below that answer JobRows put it in as {job_columns}, so the
-- list is written once.
j.job_id, t.id AS tenant_id, s.id AS source_id, d.id AS destination_id, j.user_id,
j.message_id, j.state::text AS state, j.attempts, j.retry_at, j.blocked_by, j.error_code,
j.created_at, j.updated_at, j.first_attempt_at

-- name: log_head
-- The newest event id (where a listing's windows end).
SELECT coalesce(max(event_id), 0) FROM events;

-- name: list
-- Keyset pagination in job order: a page starts after the last job_id of the previous one, so
-- pages stay stable while jobs are added (new ids are larger) and delivered (a job that
-- changes state is either on its page or not; no other job moves between pages).
SELECT {job_columns},
       CASE WHEN %(include_payload)s THEN j.document END AS payload, j.traceparent
FROM {view} j
JOIN tenants t ON t.tenant_key = j.tenant_key
JOIN sources s ON s.source_key = j.source_key
JOIN destinations d ON d.destination_key = j.destination_key
WHERE j.job_id > %(after)s
  AND (%(scope)s::integer IS NULL OR j.tenant_key = %(scope)s)
  AND ({where})
ORDER BY j.job_id
LIMIT %(limit)s;

-- name: get_row
-- Jobs that have a row (of one event), with its document and traceparent.
SELECT {job_columns}, e.document AS payload, e.traceparent
FROM jobs j
JOIN events e ON e.event_id = j.job_id >> 16
JOIN tenants t ON t.tenant_key = j.tenant_key
JOIN sources s ON s.source_key = j.source_key
JOIN destinations d ON d.destination_key = j.destination_key
WHERE j.job_id = ANY(%(job_ids)s::bigint[])
  AND (%(scope)s::integer IS NULL OR j.tenant_key = %(scope)s);

-- name: get_event_job
-- An event's jobs without a row: the event, the connections of these slots, and where each
-- destination's cursor is in the event's partition (the caller decides whether each is a
-- job at all).
SELECT e.event_id, e.created_at, e.user_id, e.message_id, e.destinations, e.document,
       c.destination_key, c.enabled, c.event_filter,
       coalesce(dc.position, l.frontier) AS cursor,
       t.id AS tenant_id, s.id AS source_id, d.id AS destination_id, e.traceparent, c.slot
FROM events e
JOIN connections c ON c.source_key = e.source_key AND c.slot = ANY(%(slots)s::integer[])
JOIN router_leases l ON l.partition = e.ordering_partition
LEFT JOIN destination_cursors dc ON dc.destination_key = c.destination_key
                                AND dc.partition = e.ordering_partition
JOIN tenants t ON t.tenant_key = e.tenant_key
JOIN sources s ON s.source_key = e.source_key
JOIN destinations d ON d.destination_key = c.destination_key
WHERE e.event_id = %(event_id)s
  AND e.event_id > coalesce(c.backfill_after, 0)
  AND (%(scope)s::integer IS NULL OR e.tenant_key = %(scope)s);

-- name: history
-- Every attempt and operator action of jobs that have (or had) a row, oldest first.
SELECT job_id, attempt, state::text AS state, error_code, response, started_at, duration_ms,
       retry_at, actor, reason, batch
FROM job_statuses
WHERE job_id = ANY(%(job_ids)s::bigint[])
ORDER BY job_id, recorded_at, attempt;

-- name: delivered
-- The deliveries of an event read from the log to the destinations of the connections of
-- these slots: which request carried it, when, and what the destination answered (the GiST
-- index finds the rows whose span holds the event; the array says whether this event is
-- among theirs).
SELECT c.slot, d.recorded_at, d.actor, d.started_at[d.requests[x.n]] AS started_at,
       d.duration_ms[d.requests[x.n]] AS duration_ms, d.status[d.requests[x.n]] AS status,
       nullif(d.batch[d.requests[x.n]], '') AS batch
FROM events e
JOIN connections c ON c.source_key = e.source_key AND c.slot = ANY(%(slots)s::integer[])
JOIN deliveries d
  ON box(point(d.destination_key, d.first_event_id), point(d.destination_key, d.last_event_id))
     @> box(point(c.destination_key, e.event_id), point(c.destination_key, e.event_id))
CROSS JOIN LATERAL (SELECT array_position(d.event_ids, e.event_id) AS n) x
WHERE e.event_id = %(event_id)s
  AND x.n IS NOT NULL
ORDER BY c.slot, d.recorded_at;

-- name: peek
-- The destination's unfinished jobs in job order, the way its router sees them: its
-- unfinished rows, and its events above its cursor in each partition (one scan per
-- partition, each stopping at the limit), each with the job that holds it: a waiting row's
-- blocker; for a failed or pending row, job_holder() (the barrier rule pickup obeys); for
-- an event read from the log, the root of its user's earliest unfinished row before it
-- (the router parks it behind that). `limit` bounds the rows, each partition's events, and
-- the answer.
WITH unfinished AS (
    (SELECT r.job_id
     FROM jobs r
     WHERE r.destination_key = %(destination_key)s
       AND r.state IN ('pending', 'failed', 'waiting')
     ORDER BY r.job_id
     LIMIT %(limit)s)
),
pending AS (
    SELECT e.*
    FROM router_leases l
    LEFT JOIN destination_cursors dc ON dc.destination_key = %(destination_key)s
                                    AND dc.partition = l.partition
    CROSS JOIN LATERAL (
        SELECT ev.event_id, ev.ordering_partition, ev.user_id, ev.source_key
        FROM events ev
        WHERE ev.ordering_partition = l.partition
          AND ev.event_id > coalesce(dc.position, l.frontier)
          AND ev.source_key = ANY(%(sources)s::integer[])
          AND (ev.destinations IS NULL OR %(destination_key)s = ANY(ev.destinations))
        ORDER BY ev.event_id
        LIMIT %(limit)s
    ) e
),
logged AS (
    SELECT j.job_id FROM (
        SELECT (p.event_id << 16) | c.slot AS job_id, c.destination_key, p.source_key,
               ev.document::jsonb AS payload
        FROM pending p
        JOIN connections c ON c.source_key = p.source_key
                          AND c.destination_key = %(destination_key)s
        JOIN events ev ON ev.event_id = p.event_id
        WHERE NOT EXISTS (SELECT 1 FROM jobs r WHERE r.job_id = (p.event_id << 16) | c.slot)
    ) j
    WHERE {subscribed}
),
chosen AS (
    SELECT job_id FROM (SELECT job_id FROM unfinished UNION ALL SELECT job_id FROM logged) u
    ORDER BY job_id
    LIMIT %(limit)s
)
SELECT {job_columns}, NULL::text AS payload,
       CASE WHEN j.state = 'waiting' THEN j.blocked_by
            WHEN j.has_row THEN held.holder
            ELSE root.holder END AS holder
FROM chosen c
JOIN LATERAL (
    SELECT r.job_id, r.destination_key, r.tenant_key, r.source_key, r.user_id, r.message_id,
           r.state, r.attempts, r.retry_at, r.blocked_by, r.error_code, r.created_at,
           r.updated_at, r.first_attempt_at, true AS has_row
    FROM jobs r WHERE r.job_id = c.job_id
    UNION ALL
    SELECT c.job_id, cn.destination_key, e.tenant_key, e.source_key, e.user_id, e.message_id,
           'pending'::job_state, 0, NULL, NULL, NULL, e.created_at, e.created_at, NULL, false
    FROM events e
    JOIN connections cn ON cn.source_key = e.source_key AND cn.slot = (c.job_id & 65535)
    WHERE e.event_id = c.job_id >> 16
      AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.job_id = c.job_id)
) j ON true
JOIN tenants t ON t.tenant_key = j.tenant_key
JOIN sources s ON s.source_key = j.source_key
JOIN destinations d ON d.destination_key = j.destination_key
LEFT JOIN LATERAL job_holder(j.destination_key, j.user_id, j.job_id) held ON j.has_row
LEFT JOIN LATERAL (
    SELECT coalesce(h.blocked_by, h.job_id) AS holder
    FROM jobs h
    WHERE h.destination_key = j.destination_key
      AND h.user_id = j.user_id
      AND h.state IN ('pending', 'failed', 'waiting')
      AND h.job_id < j.job_id
    ORDER BY h.job_id
    LIMIT 1
) root ON NOT j.has_row
ORDER BY j.job_id;

-- name: retry
-- Force a retry now. A failed row's retry time becomes now. An aborted job (or, when the
-- replay parameter is true, a succeeded one, with a row or without) becomes failed and due
-- now, rather than pending: as a failed job it is again the barrier of its user, so the
-- user's jobs not yet delivered wait behind it and order holds. A waiting row whose blocker
-- already ended (nothing should leave one, but an operator can fix it) goes back to pending.
--
-- One statement counts what the selection matches and, unless the apply parameter is false
-- (a dry run), changes it: rows by compare-and-set on the state each was matched in (a router
-- that changed one meanwhile wins and this skips it), jobs without a row by writing one (a
-- router that wrote one meanwhile wins).
WITH target AS (
    SELECT j.job_id, j.state, j.has_row, j.destination_key, j.tenant_key, j.source_key,
           j.ordering_partition, j.user_id, j.message_id, j.created_at
    FROM {view} j
    WHERE (%(scope)s::integer IS NULL OR j.tenant_key = %(scope)s)
      AND ({where})
      AND ((j.has_row
            AND (j.state IN ('failed', 'aborted')
                 OR (j.state = 'succeeded' AND %(replay)s)
                 OR (j.state = 'waiting'
                     AND NOT EXISTS (SELECT 1 FROM jobs b
                                     WHERE b.job_id = j.blocked_by
                                       AND b.state IN ('pending', 'failed', 'waiting')))))
           OR (NOT j.has_row AND j.state = 'succeeded' AND %(replay)s))
),
changed AS (
    UPDATE jobs j
    SET state = CASE WHEN j.state = 'waiting' THEN 'pending' ELSE 'failed' END::job_state,
        retry_at = CASE WHEN j.state = 'waiting' THEN NULL ELSE now() END,
        blocked_by = NULL,
        updated_at = now()
    FROM target
    WHERE %(apply)s
      AND target.has_row
      AND j.job_id = target.job_id
      AND j.state = target.state
    RETURNING j.job_id, j.attempts, j.state, j.destination_key
),
written AS (
    INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition,
                      state, attempts, retry_at, created_at, user_id, message_id)
    SELECT job_id, destination_key, tenant_key, source_key, ordering_partition, 'failed', 1,
           now(), created_at, user_id, message_id
    FROM target
    WHERE %(apply)s AND NOT target.has_row
    ON CONFLICT (job_id) DO NOTHING
    RETURNING job_id, attempts, state, destination_key
),
both_ AS (
    SELECT * FROM changed UNION ALL SELECT * FROM written
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, started_at, actor, reason)
    SELECT job_id, attempts, state, now(), %(actor)s, %(reason)s
    FROM both_
)
SELECT (SELECT count(*) FROM target) AS matched,
       coalesce(array_agg(job_id), ARRAY[]::bigint[]) AS job_ids,
       coalesce(string_agg(DISTINCT destination_key::text, ','), '') AS destination_keys
FROM both_;

-- name: abort
-- Give up on unfinished jobs: count what the selection matches and, unless apply is false,
-- abort it: rows by compare-and-set as in `retry`, jobs not yet read from the log by writing
-- an aborted row (which the router that reads them skips). The jobs waiting behind aborted
-- rows are released by a separate statement (queue.sql `release`) in the same transaction:
-- a router parking jobs behind one of these holds a share lock on it, so this UPDATE waits
-- for that to commit, and the release, with a newer snapshot, then sees those parked jobs too.
WITH target AS (
    SELECT j.job_id, j.state, j.has_row, j.destination_key, j.tenant_key, j.source_key,
           j.ordering_partition, j.user_id, j.message_id, j.created_at
    FROM {view} j
    WHERE (%(scope)s::integer IS NULL OR j.tenant_key = %(scope)s)
      AND ({where})
      AND j.state IN ('pending', 'failed', 'waiting')
),
changed AS (
    UPDATE jobs j
    SET state = 'aborted', retry_at = NULL, blocked_by = NULL, updated_at = now()
    FROM target
    WHERE %(apply)s
      AND target.has_row
      AND j.job_id = target.job_id
      AND j.state = target.state
    RETURNING j.job_id, j.attempts, j.destination_key
),
written AS (
    INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition,
                      state, attempts, created_at, user_id, message_id)
    SELECT job_id, destination_key, tenant_key, source_key, ordering_partition, 'aborted', 0,
           created_at, user_id, message_id
    FROM target
    WHERE %(apply)s AND NOT target.has_row
    ON CONFLICT (job_id) DO NOTHING
    RETURNING job_id, attempts, destination_key
),
both_ AS (
    SELECT * FROM changed UNION ALL SELECT * FROM written
),
logged AS (
    INSERT INTO job_statuses (job_id, attempt, state, started_at, actor, reason)
    SELECT job_id, attempts, 'aborted', now(), %(actor)s, %(reason)s
    FROM both_
),
counted AS (
    INSERT INTO delivery_counts AS c (destination_key, bucket, aborted)
    SELECT destination_key, to_timestamp(floor(extract(epoch FROM now()) / 10) * 10), count(*)
    FROM both_
    GROUP BY destination_key
    ORDER BY destination_key
    ON CONFLICT (destination_key, bucket) DO UPDATE SET aborted = c.aborted + excluded.aborted
)
SELECT (SELECT count(*) FROM target) AS matched,
       coalesce(array_agg(job_id), ARRAY[]::bigint[]) AS job_ids,
       coalesce(string_agg(DISTINCT destination_key::text, ','), '') AS destination_keys
FROM both_;

-- name: notify
-- Wake the routers of these destinations (and, with 'relayq_reorder', make them learn again
-- who waits behind which row and re-read what they hold of them, because an operator put an
-- old job back in front of newer ones or aborted jobs they have not read yet).
SELECT pg_notify(%(channel)s, %(destinations)s);

-- name: stats
-- Per destination: unfinished rows counted from their partial indexes; its events above its
-- cursors (`pending`, from the log: only the events above the lowest cursor of each
-- partition are read, a tail of the log while routers keep up), less its deliveries on record
-- above the frontiers; the oldest pending job; and delivery counts and recent rates from
-- delivery_counts. Never a scan of settled events.
WITH tail AS (
    SELECT j.destination_key, count(*) AS pending, min(j.created_at) AS oldest
    FROM (
        SELECT c.destination_key, e.source_key, e.created_at, e.document::jsonb AS payload
        FROM router_leases l
        -- One index scan per partition, from its lowest cursor (OFFSET 0 keeps the planner
        -- from flattening it into a scan of the whole log filtered row by row).
        CROSS JOIN LATERAL (
            SELECT ev.event_id, ev.source_key, ev.tenant_key, ev.created_at, ev.destinations,
                   ev.document
            FROM events ev
            WHERE ev.ordering_partition = l.partition
              AND ev.event_id > least(l.frontier, (SELECT min(position)
                                                   FROM destination_cursors
                                                   WHERE partition = l.partition))
            OFFSET 0
        ) e
        JOIN connections c ON c.source_key = e.source_key AND c.enabled
                          AND (e.destinations IS NULL OR c.destination_key = ANY(e.destinations))
        LEFT JOIN destination_cursors dc ON dc.destination_key = c.destination_key
                                        AND dc.partition = l.partition
        WHERE e.event_id > coalesce(dc.position, l.frontier)
          AND (%(destination_key)s::integer IS NULL OR c.destination_key = %(destination_key)s)
          AND (%(tenant_key)s::integer IS NULL OR e.tenant_key = %(tenant_key)s)
          AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.job_id = (e.event_id << 16) | c.slot)
    ) j
    WHERE {subscribed}
    GROUP BY j.destination_key
),
-- Deliveries on record above the frontiers, which the cursors have not caught up with yet
-- (a fraction of a second's): not pending any more. Found from the recent deliveries rows,
-- not by asking for each pending event.
recent AS (
    SELECT d.destination_key, count(*) AS delivered
    FROM deliveries d
    CROSS JOIN LATERAL unnest(d.event_ids, d.partitions) AS x(event_id, partition)
    JOIN router_leases l ON l.partition = x.partition
    WHERE box(point(d.destination_key, d.first_event_id), point(d.destination_key, d.last_event_id))
          && box(point(-1, (SELECT min(frontier) FROM router_leases) + 1),
                 point(2147483648, 140737488355328))
      AND x.event_id > l.frontier
      AND NOT EXISTS (SELECT 1 FROM destination_cursors dc
                      WHERE dc.destination_key = d.destination_key
                        AND dc.partition = x.partition)
    GROUP BY d.destination_key
),
rows_ AS (
    -- One count per partial index (pending; failed; waiting), each an index scan of only
    -- the rows in that state; a single scan over the three states would read the table.
    SELECT destination_key, sum(pending) AS pending, sum(failed) AS failed,
           sum(waiting) AS waiting, min(oldest) AS oldest
    FROM (
        SELECT destination_key, count(*) AS pending, 0 AS failed, 0 AS waiting,
               min(created_at) AS oldest
        FROM jobs WHERE state = 'pending' GROUP BY destination_key
        UNION ALL
        SELECT destination_key, 0, count(*), 0, NULL FROM jobs WHERE state = 'failed'
        GROUP BY destination_key
        UNION ALL
        SELECT destination_key, 0, 0, count(*), NULL FROM jobs WHERE state = 'waiting'
        GROUP BY destination_key
    ) per_state
    GROUP BY destination_key
)
SELECT d.destination_key, d.id AS destination_id, t.id AS tenant_id, d.paused,
       greatest(0, coalesce(u.pending, 0) + coalesce(tail.pending, 0)
                   - coalesce(recent.delivered, 0))::bigint AS pending,
       coalesce(u.failed, 0)::bigint AS failed, coalesce(u.waiting, 0)::bigint AS waiting,
       coalesce(c.succeeded, 0)::bigint AS succeeded, coalesce(c.aborted, 0)::bigint AS aborted,
       extract(epoch FROM now() - least(u.oldest, tail.oldest))::float8 AS oldest_pending_seconds,
       coalesce(c.recent_succeeded, 0)::bigint AS recent_succeeded,
       coalesce(c.recent_failed, 0)::bigint AS recent_failed,
       d.circuit_opened_at, d.circuit_reason
FROM destinations d
JOIN tenants t ON t.tenant_key = d.tenant_key
LEFT JOIN rows_ u ON u.destination_key = d.destination_key
LEFT JOIN tail ON tail.destination_key = d.destination_key
LEFT JOIN recent ON recent.destination_key = d.destination_key
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
-- every backend, into one ('-infinity', backend 0) row per connection. Writers only ever
-- write the current bucket, so this never waits for them.
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
