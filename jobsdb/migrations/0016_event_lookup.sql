-- relayq schema 16: finding events, and how far back the log reaches (issue 18).
--
-- The log is kept for RELAYQ_EVENT_RETENTION_SECONDS (maintenance drops a partition only
-- when every cursor and job row has passed it AND its newest event is that old), but it can
-- have holes below: a partition kept by one unfinished job while a newer one was dropped, a
-- partition compacted down to its unfinished jobs. Replay and backfill need the point from
-- which the log is whole, so maintenance raises this floor whenever it removes events: to
-- the end of a dropped partition, past the last event a compaction removed.
CREATE TABLE event_log_floor (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    -- Every event accepted with an id at or above it is still in the log.
    floor      bigint NOT NULL DEFAULT 0,
    raised_at  timestamptz
);

INSERT INTO event_log_floor DEFAULT VALUES;

-- The oldest retained event: the first event at or above the floor (one index probe per
-- partition at most). No row for an empty log. jobsdb.eventlog.oldest_retained reads it.
CREATE FUNCTION event_log_oldest_retained(OUT event_id bigint, OUT created_at timestamptz)
RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
    SELECT e.event_id, e.created_at
    FROM events e
    WHERE e.event_id >= (SELECT f.floor FROM event_log_floor f)
    ORDER BY e.event_id
    LIMIT 1
$$;

-- The log's size, for GetStats and `relayq stats`, without reading rows: the files of every
-- partition of the four tables that go together, and the events as each events partition's
-- id span (two index probes each; ids of rolled back ingest transactions count too).
CREATE FUNCTION event_log_size(OUT bytes bigint, OUT events bigint)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    part regclass;
    low bigint;
    high bigint;
BEGIN
    SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint INTO bytes
    FROM pg_inherits i
    WHERE i.inhparent IN ('events'::regclass, 'deliveries'::regclass, 'jobs'::regclass,
                          'job_statuses'::regclass);
    events := 0;
    FOR part IN SELECT i.inhrelid::regclass FROM pg_inherits i
                WHERE i.inhparent = 'events'::regclass LOOP
        EXECUTE format('SELECT min(event_id), max(event_id) FROM %s', part) INTO low, high;
        IF low IS NOT NULL THEN
            events := events + high - low + 1;
        END IF;
    END LOOP;
END
$$;
