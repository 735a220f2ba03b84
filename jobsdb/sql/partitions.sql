-- name: settings
SELECT name, value FROM relayq_settings;

-- name: sequence_position
-- The last job id handed out (or the start, before the first one). Reading the sequence
-- relation directly has no side effect, unlike nextval.
SELECT last_value FROM jobs_job_id_seq;

-- name: existing
-- Partitions of a partitioned table with their lower bound (job id).
SELECT c.relname AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(\d+)''?\)'))[1]::bigint AS lower
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %(parent)s::regclass
ORDER BY lower;

-- name: unfinished_count
-- How many jobs of a partition are still to deliver, counted up to a cap: each branch reads
-- a partial index (only unfinished jobs are in them), so this costs at most 3 x cap index
-- entries however large the partition is.
SELECT count(*) FROM (
    (SELECT 1 FROM {partition} WHERE state = 'pending' LIMIT %(cap)s)
    UNION ALL
    (SELECT 1 FROM {partition} WHERE state = 'failed' LIMIT %(cap)s)
    UNION ALL
    (SELECT 1 FROM {partition} WHERE state = 'waiting' LIMIT %(cap)s)
) unfinished;

-- name: last_change
-- The latest change in a partition (NULL when empty): a scan, so asked rarely (see 0005).
SELECT max(updated_at) FROM {partition};

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
-- Whether compacting would remove anything: a finished job unchanged for the retention period.
SELECT EXISTS (SELECT 1 FROM {partition}
               WHERE state IN ('succeeded', 'aborted') AND updated_at < now() - %(retention)s);

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
-- Compaction, under an EXCLUSIVE lock on both partitions (no writer meanwhile): what stays,
-- set aside ...
CREATE TEMPORARY TABLE compact_jobs ON COMMIT DROP AS
SELECT * FROM {jobs}
WHERE state IN ('pending', 'failed', 'waiting') OR updated_at >= now() - %(retention)s;

-- name: compact_keep_statuses
CREATE TEMPORARY TABLE compact_statuses ON COMMIT DROP AS
SELECT s.* FROM {statuses} s WHERE s.job_id IN (SELECT job_id FROM compact_jobs);

-- name: compact_rewrite
-- ... and, under ACCESS EXCLUSIVE, the partitions emptied (new files: the space goes back to
-- the system at commit, with no dead rows left to vacuum), and what stays written back with
-- the same ids, so job order, barriers (blocked_by) and every job's history are as they were.
TRUNCATE {jobs}, {statuses};
INSERT INTO {jobs} SELECT * FROM compact_jobs;
INSERT INTO {statuses} SELECT * FROM compact_statuses;

-- name: storage
-- What job storage takes on disk, per table: partitions and their files' sizes (indexes and
-- TOAST included; no row is read), with what maintenance has noted about old partitions.
SELECT i.inhparent::regclass::text AS parent,
       count(*) AS partitions,
       sum(pg_total_relation_size(i.inhrelid))::bigint AS bytes,
       (SELECT count(finished_at) FROM job_partitions) AS finished,
       (SELECT count(sparse_at) FROM job_partitions) AS sparse
FROM pg_inherits i
WHERE i.inhparent IN ('jobs'::regclass, 'job_statuses'::regclass)
GROUP BY i.inhparent;
