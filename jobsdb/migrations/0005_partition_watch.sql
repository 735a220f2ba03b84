-- relayq schema 5: what maintenance has seen of old job partitions.
--
-- Deciding whether a partition may go needs the time of its last change, and only a scan of
-- the partition knows that (there is no index on updated_at, which every delivery writes).
-- Scanning every finished partition every round costs Postgres a full read of each, every
-- 30 seconds, for as long as retention keeps them. Instead the round notes when it first saw
-- a partition finished (one scan), and scans again only when the partition is due.
--
-- A partition that keeps a few unfinished jobs (a destination paused for weeks, a job in a
-- long retry window) cannot be dropped, and would pin its million finished rows for as long.
-- Once it has held only a few for the retention period it is compacted: rewritten with only
-- its unfinished jobs and what changed within the retention period, their history included.
CREATE TABLE job_partitions (
    number       integer PRIMARY KEY,
    -- First seen with no unfinished job; moved on when a later change is found.
    finished_at  timestamptz,
    -- First seen with few unfinished jobs (or when last compacted).
    sparse_at    timestamptz,
    -- A compaction that could not get its locks is not tried again before this.
    compact_after timestamptz
);
