-- name: settings
SELECT name, value FROM relayq_settings;

-- name: sequence_position
-- The last event id handed out (or the start, before the first one). Reading the sequence
-- relation directly has no side effect, unlike nextval.
SELECT last_value FROM events_event_id_seq;

-- name: existing
-- Partitions of a partitioned table with their lower bound (its partition key's value).
SELECT c.relname AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(\d+)''?\)'))[1]::bigint AS lower
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %(parent)s::regclass
ORDER BY lower;

-- name: cursors_passed
-- The lowest position any cursor holds: every event at or below it has been read for every
-- destination. The frontier of each ordering partition, and each destination's own cursor
-- (a destination no enabled connection reads any more holds nothing back: its cursors are
-- dropped by forget_cursors).
SELECT least((SELECT min(frontier) FROM router_leases),
             (SELECT min(position) FROM destination_cursors));

-- name: forget_cursors
-- Cursors of destinations that no enabled connection feeds: nothing will read for them, and
-- kept, they would keep every partition after them from being dropped. Connected again, a
-- destination starts from the frontier, like a new one (a backfill gives it a start).
DELETE FROM destination_cursors dc
WHERE NOT EXISTS (SELECT 1 FROM connections c
                  WHERE c.destination_key = dc.destination_key AND c.enabled);

-- name: unfinished_count
-- How many job rows of a partition are still to deliver, counted up to a cap: each branch
-- reads a partial index (only unfinished jobs are in them), so this costs at most 3 x cap
-- index entries however large the partition is.
SELECT count(*) FROM (
    (SELECT 1 FROM {jobs} WHERE state = 'pending' LIMIT %(cap)s)
    UNION ALL
    (SELECT 1 FROM {jobs} WHERE state = 'failed' LIMIT %(cap)s)
    UNION ALL
    (SELECT 1 FROM {jobs} WHERE state = 'waiting' LIMIT %(cap)s)
) unfinished;

-- name: last_change
-- The latest change in a partition group: its newest event, job row change or delivery
-- (NULL when all are empty). Scans, so asked rarely (see migration 0005).
SELECT greatest((SELECT max(created_at) FROM {events}),
                (SELECT max(updated_at) FROM {jobs}),
                (SELECT max(recorded_at) FROM {deliveries}));

-- name: newest_event
-- The time of a partition's newest event (its highest id: one probe of its primary key).
SELECT created_at FROM {events} ORDER BY event_id DESC LIMIT 1;

-- name: raise_floor
-- A partition's events are going (it is dropped): the log is whole only above its newest
-- event (migration 0016). One probe of its primary key; nothing for an empty partition.
UPDATE event_log_floor f
SET floor = n.last + 1, raised_at = now()
FROM (SELECT max(event_id) AS last FROM {events}) n
WHERE n.last IS NOT NULL AND f.floor < n.last + 1;

-- name: watched
SELECT number, finished_at, sparse_at, compact_after FROM job_partitions;

-- name: watch
INSERT INTO job_partitions (number, finished_at, sparse_at, compact_after)
VALUES (%(number)s, %(finished_at)s, %(sparse_at)s, %(compact_after)s)
ON CONFLICT (number) DO UPDATE
SET finished_at = excluded.finished_at, sparse_at = excluded.sparse_at,
    compact_after = excluded.compact_after;

-- name: unwatch
DELETE FROM job_partitions WHERE number = ANY(%(numbers)s);

-- name: removable_exists
-- Whether compacting would remove anything: an event older than the event retention period
-- that no unfinished or recently changed job row needs.
SELECT EXISTS (
    SELECT 1 FROM {events} e
    WHERE e.created_at < now() - %(event_retention)s
      AND NOT EXISTS (SELECT 1 FROM {jobs} j
                      WHERE j.job_id >> 16 = e.event_id
                        AND (j.state IN ('pending', 'failed', 'waiting')
                             OR j.updated_at >= now() - %(retention)s)));

-- name: held_long
-- Whether a transaction that began over a second ago holds a lock on these partitions: the
-- one thing (idle in transaction, a long report, pg_dump) that would keep compaction's
-- ACCESS EXCLUSIVE lock waiting after it has read the partition. Routers' statements are
-- far shorter.
SELECT EXISTS (
    SELECT 1
    FROM pg_locks l
    JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.relation = ANY(%(relations)s::regclass[])
      AND l.granted
      AND l.pid <> pg_backend_pid()
      AND a.xact_start < now() - interval '1 second'
);

-- name: compact_keep
-- Compaction, under an EXCLUSIVE lock on the partitions (no writer meanwhile): what stays,
-- set aside: unfinished job rows and rows changed within the retention period, their
-- history, the events they need or that are recent, and recent deliveries ...
CREATE TEMPORARY TABLE compact_jobs ON COMMIT DROP AS
SELECT * FROM {jobs}
WHERE state IN ('pending', 'failed', 'waiting') OR updated_at >= now() - %(retention)s;

-- name: compact_keep_statuses
CREATE TEMPORARY TABLE compact_statuses ON COMMIT DROP AS
SELECT s.* FROM {statuses} s WHERE s.job_id IN (SELECT job_id FROM compact_jobs);

-- name: compact_keep_events
CREATE TEMPORARY TABLE compact_events ON COMMIT DROP AS
SELECT e.* FROM {events} e
WHERE e.created_at >= now() - %(event_retention)s
   OR e.event_id IN (SELECT job_id >> 16 FROM compact_jobs);

-- name: compact_keep_deliveries
-- (Kept as long as the events: GetEvent says when and how an event was delivered.)
CREATE TEMPORARY TABLE compact_deliveries ON COMMIT DROP AS
SELECT d.* FROM {deliveries} d
WHERE d.recorded_at >= now() - greatest(%(retention)s, %(event_retention)s);

-- name: compact_floor
-- The log is whole only above the last event this compaction removes (migration 0016).
UPDATE event_log_floor f
SET floor = r.last + 1, raised_at = now()
FROM (SELECT max(e.event_id) AS last FROM {events} e
      WHERE NOT EXISTS (SELECT 1 FROM compact_events k WHERE k.event_id = e.event_id)) r
WHERE r.last IS NOT NULL AND f.floor < r.last + 1;

-- name: compact_rewrite
-- ... and, under ACCESS EXCLUSIVE, the partitions emptied (new files: the space goes back to
-- the system at commit, with no dead rows left to vacuum), and what stays written back with
-- the same ids, so job order, barriers (blocked_by) and every job's history are as they were.
TRUNCATE {events}, {jobs}, {statuses}, {deliveries};
INSERT INTO {events} SELECT * FROM compact_events;
INSERT INTO {jobs} SELECT * FROM compact_jobs;
INSERT INTO {statuses} SELECT * FROM compact_statuses;
INSERT INTO {deliveries} SELECT * FROM compact_deliveries;

-- name: legacy_exists
-- Whether the job tables from before the event log are still there (migration 0012 kept them
-- as jobs_v1 and job_statuses_v1, for reference, until maintenance drops them).
SELECT to_regclass('jobs_v1') IS NOT NULL;

-- name: legacy_last_change
SELECT max(updated_at) FROM {partition};

-- name: legacy_drop
DROP TABLE jobs_v1, job_statuses_v1;
DROP SEQUENCE IF EXISTS jobs_v1_job_id_seq;

-- name: storage
-- What the log takes on disk, per table: partitions and their files' sizes (indexes and
-- TOAST included; no row is read), with what maintenance has noted about old partitions.
SELECT i.inhparent::regclass::text AS parent,
       count(*) AS partitions,
       sum(pg_total_relation_size(i.inhrelid))::bigint AS bytes,
       (SELECT count(finished_at) FROM job_partitions) AS finished,
       (SELECT count(sparse_at) FROM job_partitions) AS sparse
FROM pg_inherits i
WHERE i.inhparent IN ('events'::regclass, 'deliveries'::regclass, 'jobs'::regclass,
                      'job_statuses'::regclass)
GROUP BY i.inhparent;

-- name: horizon
-- Every event id below it is settled (migration 0012): a partition that ends at or below it
-- is written no more.
SELECT event_log_horizon();

-- name: lookup_indexes
-- The message-id indexes of events partitions, and whether each is valid (a CREATE INDEX
-- CONCURRENTLY that failed leaves an invalid one behind).
SELECT i.relname AS name, x.indisvalid AS valid
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_inherits h ON h.inhrelid = x.indrelid
WHERE h.inhparent = 'events'::regclass
  AND i.relname LIKE 'events\_p%\_lookup';

-- name: lookup_index
-- GetEvent by (source, message id) on a partition ingest has left (jobsdb/sql/events.sql
-- by_message).
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {partition} (source_key, message_id);
