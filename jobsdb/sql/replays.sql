-- Replays and backfills (migration 0017): what an operator asked for, and the rows a router's
-- replay worker writes for it a chunk at a time (jobsdb.replays builds the chunk statement,
-- which carries the replay's filter).

-- name: connection
-- The connection a replay goes through (enabled or not).
SELECT c.slot, c.enabled, c.event_filter, c.backfill_after
FROM connections c
WHERE c.source_key = %(source_key)s AND c.destination_key = %(destination_key)s;

-- name: other_connections
-- Whether the destination takes events of a source other than this one (a backfill is
-- refused there: see jobsdb.replays).
SELECT EXISTS (SELECT 1 FROM connections
               WHERE destination_key = %(destination_key)s
                 AND source_key <> %(source_key)s AND enabled) AS shared;

-- name: newest
-- The newest id below the log's horizon: every event at or below it is committed or gone.
SELECT event_log_horizon() - 1 AS event_id;

-- name: created_at_or_after
-- The time of the first event at or after an id (by the primary key: one index probe); the
-- binary search of jobsdb.replays.id_at makes a time into an id with these.
SELECT event_id, created_at FROM events WHERE event_id >= %(event_id)s ORDER BY event_id LIMIT 1;

-- name: running
-- A running replay no other router is working on, oldest first; locked until the chunk's
-- commit, so each replay has one writer at a time.
SELECT r.*, c.slot, c.event_filter AS connection_filter
FROM replays r
JOIN connections c ON c.source_key = r.source_key AND c.destination_key = r.destination_key
WHERE r.state = 'running'
  AND r.replay_id <> ALL(%(skip)s::text[])
ORDER BY r.created_at
LIMIT 1
FOR UPDATE OF r SKIP LOCKED;

-- name: create
INSERT INTO replays (replay_id, kind, tenant_key, source_key, destination_key, after_event_id,
                     last_event_id, from_time, to_time, filter, matched, position, actor,
                     reason)
VALUES (%(replay_id)s, %(kind)s, %(tenant_key)s, %(source_key)s, %(destination_key)s,
        %(after)s, %(last)s, %(from_time)s, %(to_time)s, %(filter)s, %(matched)s, %(after)s,
        %(actor)s, %(reason)s);

-- name: advance
-- Where a chunk left the replay. Not its state: an UPDATE naming the state column fires the
-- triggers that make every router reload (migration 0017), changed or not.
UPDATE replays
SET position = %(position)s, written = written + %(written)s
WHERE replay_id = %(replay_id)s AND state = 'running';

-- name: finish
-- The last chunk: every row is written (routers reload: a backfill's destination reads on).
UPDATE replays
SET state = 'done', finished_at = now()
WHERE replay_id = %(replay_id)s AND state = 'running';

-- name: cancel
-- Stop writing rows; the ones written are given up on below (cancel_rows).
UPDATE replays
SET state = 'cancelled', finished_at = now(), cancelled_by = %(actor)s
WHERE replay_id = %(replay_id)s AND state = 'running'
RETURNING replay_id;

-- name: rows
-- Replays as operators see them, newest first, with their rows' progress: how many are
-- still to be delivered (pending, failed, waiting) and how many were given up on.
SELECT r.replay_id, r.kind, t.id AS tenant_id, s.id AS source_id, d.id AS destination_id,
       r.after_event_id, r.last_event_id, r.from_time, r.to_time, coalesce(r.filter, '') AS filter,
       r.state::text AS state, r.matched, r.written, r.position, r.actor, r.reason, r.created_at,
       r.finished_at, coalesce(r.cancelled_by, '') AS cancelled_by,
       coalesce(p.unfinished, 0) AS unfinished, coalesce(p.aborted, 0) AS aborted
FROM replays r
JOIN tenants t ON t.tenant_key = r.tenant_key
JOIN sources s ON s.source_key = r.source_key
JOIN destinations d ON d.destination_key = r.destination_key
-- Counted by state through jobs_replay_idx, so the delivered rows (most of a large replay's,
-- soon) are never read.
LEFT JOIN LATERAL (
    SELECT (SELECT count(*) FROM jobs j
            WHERE j.replay_id = r.replay_id
              AND j.state IN ('pending', 'failed', 'waiting')) AS unfinished,
           (SELECT count(*) FROM jobs j
            WHERE j.replay_id = r.replay_id AND j.state = 'aborted') AS aborted
) p ON true
WHERE (%(scope)s::integer IS NULL OR r.tenant_key = %(scope)s)
  AND (%(replay_id)s::text IS NULL OR r.replay_id = %(replay_id)s)
  AND (%(destination_key)s::integer IS NULL OR r.destination_key = %(destination_key)s)
  AND (%(state)s::text IS NULL OR r.state::text = %(state)s)
  AND (%(before)s::timestamptz IS NULL
       OR (r.created_at, r.replay_id) < (%(before)s, %(before_id)s))
ORDER BY r.created_at DESC, r.replay_id DESC
LIMIT %(limit)s;

-- name: cursors_at
-- A backfilled destination's place in every ordering partition: it reads the log on its own
-- from the backfill's end (lower where it already had a place of its own).
INSERT INTO destination_cursors AS c (destination_key, partition, position)
SELECT %(destination_key)s, p, %(position)s
FROM generate_series(0, (SELECT value::integer - 1 FROM relayq_settings
                         WHERE name = 'ordering_partitions')) AS p
ON CONFLICT (destination_key, partition) DO UPDATE
SET position = least(c.position, excluded.position), updated_at = now();

-- name: backfill_connection
UPDATE connections
SET backfill_after = %(after)s
WHERE source_key = %(source_key)s AND destination_key = %(destination_key)s;

-- name: unfinished
-- A replay's rows not delivered yet (a cancel aborts them).
SELECT job_id
FROM jobs
WHERE replay_id = %(replay_id)s AND state IN ('pending', 'failed', 'waiting')
ORDER BY job_id;
