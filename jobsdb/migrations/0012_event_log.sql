-- relayq schema 12: the event log. Each accepted event is written once; routers read the log
-- in id order per ordering partition and remember only what must be remembered.
--
-- Until now ingest wrote one `jobs` row per (event, destination), the document copied into
-- each, and the router wrote each job again when it succeeded. Now:
--
-- - `events` holds each accepted event once (with the destinations it names, if any);
--   ingest's cost no longer depends on how many destinations are connected or on their
--   filters, which routers apply when they read.
-- - A job is still an (event, destination) pair, with the id (event_id << 16) | slot, slot
--   being the connection's number within its source (connections.slot): ids stay int64, in
--   event order for every destination, and computable without a row.
-- - `jobs` keeps a row only for a job that needs one: a failed attempt (with its retry time),
--   a job held behind its user's failed one (waiting), an aborted job, a job an operator
--   acted on. `job_statuses` keeps their history as before.
-- - Success is recorded by moving a cursor: `router_leases.frontier` per ordering partition
--   (everything of the partition at or below it is settled for every destination without a
--   cursor of its own), and `destination_cursors` for the destinations that fell behind
--   (paused, circuit open, slow) or were given a starting point of their own. One write per
--   partition and flush, not per job.
-- - `deliveries` records each delivery a router made (one row per destination and flush,
--   with the requests' times, answers and batch ids), so "was event X delivered to Y, when,
--   and what did it answer" stays answerable without a row per job.
--
-- Jobs still unfinished in the old table are carried over: one event per (source, message_id)
-- in the order of their old ids, naming the destinations that had not finished, so they are
-- read first and in each user's order; failed and waiting ones keep their rows and history.
-- The old tables stay as jobs_v1 and job_statuses_v1 for reference; maintenance drops their
-- partitions once nothing in them changed for the retention period.

-- ---------------------------------------------------------------------------------------
-- The old tables, moved aside.
-- ---------------------------------------------------------------------------------------

DO $$
DECLARE
    child record;
BEGIN
    FOR child IN
        SELECT c.relname, p.relname AS parent
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname IN ('jobs', 'job_statuses')
    LOOP
        EXECUTE format('ALTER TABLE %I RENAME TO %I', child.relname,
                       regexp_replace(child.relname, '^(jobs|job_statuses)_', '\1_v1_'));
    END LOOP;
END
$$;

ALTER TABLE jobs RENAME TO jobs_v1;
ALTER TABLE job_statuses RENAME TO job_statuses_v1;
ALTER INDEX jobs_pending_idx RENAME TO jobs_v1_pending_idx;
ALTER INDEX jobs_failed_idx RENAME TO jobs_v1_failed_idx;
ALTER INDEX jobs_held_idx RENAME TO jobs_v1_held_idx;
ALTER INDEX jobs_waiting_idx RENAME TO jobs_v1_waiting_idx;
ALTER INDEX jobs_created_brin RENAME TO jobs_v1_created_brin;
ALTER INDEX job_statuses_job_idx RENAME TO job_statuses_v1_job_idx;
ALTER SEQUENCE jobs_job_id_seq RENAME TO jobs_v1_job_id_seq;
DROP FUNCTION job_holder(integer, text, bigint);
-- Maintenance's notes were about job partitions; the numbers now count event partitions.
TRUNCATE job_partitions;

-- Partitions hold this many event ids each (and the job ids of those events).
UPDATE relayq_settings SET name = 'event_partition_size' WHERE name = 'job_partition_size';

-- ---------------------------------------------------------------------------------------
-- The ordering key's partition: of the user alone, so that an event has one partition for
-- every destination and a router reads each of its partitions once for all of them.
-- jobsdb.keyspace.partition_of computes the same in Python (a test holds them equal).
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION ordering_partition_of(of_user text, partitions integer) RETURNS smallint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT (('x' || left(md5(of_user), 8))::bit(32)::bigint % partitions)::smallint
$$;

-- ---------------------------------------------------------------------------------------
-- The log.
-- ---------------------------------------------------------------------------------------

-- CACHE 1, as before: ids follow the order in which ingest transactions ask for them, so a
-- user's later event always gets a larger id. 47 bits: a job id is event_id << 16 | slot.
CREATE SEQUENCE events_event_id_seq AS bigint MAXVALUE 140737488355327 CACHE 1;

-- The document is stored as text, not jsonb: ingest has already checked it (JSON that jsonb
-- accepts), routers deliver it as it is, and parsing it into jsonb was the largest part of
-- Postgres's cost of an event. Operators' filters over payload fields cast it when they run.
CREATE TABLE events (
    event_id            bigint NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    source_key          integer NOT NULL,
    tenant_key          integer NOT NULL,
    ordering_partition  smallint NOT NULL,
    user_id             text NOT NULL,
    message_id          text NOT NULL,
    -- The destinations the producer named (destination_ids); NULL: every connection.
    destinations        integer[],
    document            text NOT NULL,
    PRIMARY KEY (event_id)
) PARTITION BY RANGE (event_id);

-- The routers' read: one ordering partition in id order.
CREATE INDEX events_partition_idx ON events (ordering_partition, event_id);
CREATE INDEX events_created_brin ON events USING brin (created_at);

-- Which ids are settled. Sequence values are not committed in order: an event whose
-- transaction commits after a later-numbered one's must still be read, so a reader only goes
-- below the horizon this returns, under which every id drawn is committed or rolled back.
--
-- Every writer of events takes, before it draws ids, a shared advisory lock whose key holds
-- the last id drawn at that moment (lock_event_log_writer); it draws only larger ids, and
-- holds the lock until it ends. The horizon reads the sequence first, then the locks held:
-- every id at or below both was drawn by a transaction that has ended (one still running
-- holds its lock, keyed below its ids; one that drew after the sequence was read drew above
-- it). A reader must then read with a snapshot taken after this returned (a later statement
-- in read committed). Only writers of events hold the horizon back, not every transaction in
-- the cluster, as pg_snapshot_xmin would.
CREATE FUNCTION lock_event_log_writer() RETURNS void
LANGUAGE sql VOLATILE
AS $$
    SELECT pg_advisory_xact_lock_shared(
        (x'72710000'::bigint << 32) + (SELECT last_value - (NOT is_called)::integer
                                       FROM events_event_id_seq))
$$;

CREATE FUNCTION event_log_horizon() RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    drawn bigint;
    oldest bigint;
BEGIN
    SELECT last_value - (NOT is_called)::integer INTO drawn FROM events_event_id_seq;
    SELECT min(((l.classid::bigint << 32) | l.objid::bigint) - (x'72710000'::bigint << 32))
    INTO oldest
    FROM pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid::bigint BETWEEN x'72710000'::bigint AND x'7271ffff'::bigint;
    RETURN least(drawn, oldest) + 1;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Connections are numbered within their source: the low 16 bits of their jobs' ids.
-- A number is never reused (a connection is disabled, not deleted).
-- ---------------------------------------------------------------------------------------

ALTER TABLE connections ADD COLUMN slot integer;
UPDATE connections c
SET slot = n.slot
FROM (SELECT source_key, destination_key,
             row_number() OVER (PARTITION BY source_key ORDER BY created_at, destination_key)
                 AS slot
      FROM connections) n
WHERE n.source_key = c.source_key AND n.destination_key = c.destination_key;
ALTER TABLE connections
    ALTER COLUMN slot SET NOT NULL,
    ADD CONSTRAINT connections_slot_check CHECK (slot BETWEEN 1 AND 65535),
    ADD CONSTRAINT connections_source_slot_key UNIQUE (source_key, slot);

-- Every new connection takes the next number of its source, however it is written (the
-- admin service, a test, a script). The source's row is locked first, so connections made at
-- once to one source queue here, and the count below, a statement of its own, sees the ones
-- that committed meanwhile.
CREATE FUNCTION connections_number() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.slot IS NULL THEN
        PERFORM 1 FROM sources WHERE source_key = NEW.source_key FOR UPDATE;
        SELECT coalesce(max(slot), 0) + 1 INTO NEW.slot
        FROM connections WHERE source_key = NEW.source_key;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER connections_number BEFORE INSERT ON connections
    FOR EACH ROW EXECUTE FUNCTION connections_number();

-- ---------------------------------------------------------------------------------------
-- Jobs that need a row, and their history.
-- ---------------------------------------------------------------------------------------

CREATE TABLE jobs (
    job_id              bigint NOT NULL,
    destination_key     integer NOT NULL,
    tenant_key          integer NOT NULL,
    source_key          integer NOT NULL,
    ordering_partition  smallint NOT NULL,
    state               job_state NOT NULL,
    attempts            integer NOT NULL DEFAULT 0,
    blocked_by          bigint,
    retry_at            timestamptz,
    first_attempt_at    timestamptz,
    -- The event's.
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    user_id             text NOT NULL,
    message_id          text NOT NULL,
    error_code          text,
    PRIMARY KEY (job_id)
) PARTITION BY RANGE (job_id);

-- As before (migration 1): runnable rows in job order, due retries by time, the barrier,
-- and the jobs waiting behind one that ends.
CREATE INDEX jobs_pending_idx ON jobs (destination_key, job_id) WHERE state = 'pending';
CREATE INDEX jobs_failed_idx ON jobs (destination_key, retry_at) WHERE state = 'failed';
CREATE INDEX jobs_held_idx ON jobs (destination_key, user_id, job_id)
    WHERE state IN ('pending', 'failed', 'waiting');
CREATE INDEX jobs_waiting_idx ON jobs (blocked_by) WHERE state = 'waiting';

CREATE TABLE job_statuses (
    job_id       bigint NOT NULL,
    attempt      integer NOT NULL,
    state        job_state NOT NULL,
    error_code   text,
    response     text,
    started_at   timestamptz NOT NULL,
    duration_ms  integer,
    retry_at     timestamptz,
    actor        text NOT NULL,
    reason       text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    batch        text
) PARTITION BY RANGE (job_id);

CREATE INDEX job_statuses_job_idx ON job_statuses (job_id);

-- The barrier's one definition (as in migration 7, over the rows that exist): a job is held
-- by the earliest failed or waiting row of its (destination, user) before it.
CREATE FUNCTION job_holder(of_destination integer, of_user text, before_job bigint)
RETURNS TABLE (holder bigint)
LANGUAGE sql STABLE
AS $$
    SELECT nullif(coalesce(h.blocked_by, h.job_id), before_job)
    FROM jobs h
    WHERE h.destination_key = of_destination
      AND h.user_id = of_user
      AND h.state IN ('failed', 'waiting')
      AND h.job_id < before_job
    ORDER BY h.job_id
    LIMIT 1
$$;

-- ---------------------------------------------------------------------------------------
-- Cursors and the record of deliveries.
-- ---------------------------------------------------------------------------------------

-- Everything of the partition at or below the frontier is settled for every destination
-- that has no cursor of its own there. Moved only by the partition's lease holder, in the
-- statement that checks the lease.
ALTER TABLE router_leases ADD COLUMN frontier bigint NOT NULL DEFAULT 0;

-- A destination's own position in a partition: everything at or below it is settled for
-- it. Exists while the destination is behind the frontier (or was given a start of its own).
CREATE TABLE destination_cursors (
    destination_key  integer NOT NULL REFERENCES destinations ON DELETE CASCADE,
    partition        smallint NOT NULL,
    position         bigint NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination_key, partition)
);

CREATE INDEX destination_cursors_partition_idx ON destination_cursors (partition);

-- One row per destination and router flush: the events delivered (in id order, each with its
-- ordering partition) and the requests that carried them. Event i travelled in request
-- requests[i], which started at started_at[r], took duration_ms[r], was answered status[r]
-- and, for a batch, had the webhook-id batch[r] ('' otherwise). Partitioned like events (by the first event's partition; a flush
-- writes one row per event partition), so it goes with them.
CREATE TABLE deliveries (
    destination_key  integer NOT NULL,
    first_event_id   bigint NOT NULL,
    last_event_id    bigint NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    actor            text NOT NULL,
    event_ids        bigint[] NOT NULL,
    partitions       smallint[] NOT NULL,
    requests         integer[] NOT NULL,
    started_at       timestamptz[] NOT NULL,
    duration_ms      integer[] NOT NULL,
    status           text[] NOT NULL,
    batch            text[] NOT NULL
) PARTITION BY RANGE (first_event_id);

-- Finding the row that holds (destination, event): a row covers a rectangle (its destination
-- by its first to last event), found with a GiST index of boxes, which core Postgres has (a
-- btree over ranges cannot answer "which range holds x"; btree_gist is an extension, and not
-- every Postgres relayq runs on has it). Event ids stay below 2^47: exact as float8.
CREATE INDEX deliveries_span_idx ON deliveries USING gist (
    box(point(destination_key, first_event_id), point(destination_key, last_event_id)));

-- Whether an event's delivery to a destination is on record. Operators' queries ask it of
-- the jobs above a cursor (the cursors follow the deliveries a moment later), so that a job
-- delivered and recorded is never shown as pending. Inlined (a STABLE SQL function).
CREATE FUNCTION relayq_delivered(of_destination integer, of_event bigint) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (
        SELECT 1 FROM deliveries d
        WHERE box(point(d.destination_key, d.first_event_id),
                  point(d.destination_key, d.last_event_id))
              @> box(point(of_destination, of_event), point(of_destination, of_event))
          AND of_event = ANY(d.event_ids))
$$;

-- ---------------------------------------------------------------------------------------
-- Jobs still unfinished in the old table, carried over.
-- ---------------------------------------------------------------------------------------

-- New job ids start above every old one.
SELECT setval('events_event_id_seq',
              greatest(1, (SELECT coalesce(max(job_id), 0) FROM jobs_v1) >> 16) + 1, false);

CREATE TEMPORARY TABLE migrated_events ON COMMIT DROP AS
SELECT nextval('events_event_id_seq') AS event_id, ordered.*
FROM (
    SELECT j.source_key, j.message_id, min(j.job_id) AS first_job,
           min(j.tenant_key) AS tenant_key, min(j.user_id) AS user_id,
           min(j.created_at) AS created_at,
           array_agg(DISTINCT j.destination_key) AS destinations,
           (array_agg(j.payload::text ORDER BY j.job_id))[1] AS document
    FROM jobs_v1 j
    WHERE j.state IN ('pending', 'failed', 'waiting')
    GROUP BY j.source_key, j.message_id
    ORDER BY min(j.job_id)
) ordered;

DO $$
DECLARE
    size bigint := (SELECT value::bigint FROM relayq_settings
                    WHERE name = 'event_partition_size');
    low bigint;
    high bigint;
    number bigint;
BEGIN
    SELECT min(event_id), max(event_id) INTO low, high FROM migrated_events;
    IF low IS NULL THEN
        RETURN;
    END IF;
    FOR number IN low / size .. high / size LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                       'events_p' || lpad(number::text, 8, '0'),
                       number * size, (number + 1) * size);
        EXECUTE format('CREATE TABLE %I PARTITION OF jobs FOR VALUES FROM (%s) TO (%s)',
                       'jobs_p' || lpad(number::text, 8, '0'),
                       (number * size) << 16, ((number + 1) * size) << 16);
        EXECUTE format('CREATE TABLE %I PARTITION OF job_statuses FOR VALUES FROM (%s) TO (%s)',
                       'job_statuses_p' || lpad(number::text, 8, '0'),
                       (number * size) << 16, ((number + 1) * size) << 16);
        EXECUTE format('CREATE TABLE %I PARTITION OF deliveries FOR VALUES FROM (%s) TO (%s)',
                       'deliveries_p' || lpad(number::text, 8, '0'),
                       number * size, (number + 1) * size);
    END LOOP;
END
$$;

INSERT INTO events (event_id, created_at, source_key, tenant_key, ordering_partition, user_id,
                    message_id, destinations, document)
SELECT m.event_id, m.created_at, m.source_key, m.tenant_key,
       ordering_partition_of(m.user_id, (SELECT value::integer FROM relayq_settings
                                          WHERE name = 'ordering_partitions')),
       m.user_id, m.message_id, m.destinations, m.document
FROM migrated_events m;

-- Old job id -> new job id, for the unfinished jobs.
CREATE TEMPORARY TABLE migrated_jobs ON COMMIT DROP AS
SELECT j.job_id AS old_id, (m.event_id << 16) | c.slot AS job_id
FROM jobs_v1 j
JOIN migrated_events m ON m.source_key = j.source_key AND m.message_id = j.message_id
JOIN connections c ON c.source_key = j.source_key AND c.destination_key = j.destination_key
WHERE j.state IN ('pending', 'failed', 'waiting');

-- Failed and waiting jobs keep their rows (a pending job that was tried before, too, so its
-- attempt count goes on); the other pending ones are simply unread events now.
INSERT INTO jobs (job_id, destination_key, tenant_key, source_key, ordering_partition, state,
                  attempts, blocked_by, retry_at, first_attempt_at, created_at, updated_at,
                  user_id, message_id, error_code)
SELECT mj.job_id, j.destination_key, j.tenant_key, j.source_key,
       ordering_partition_of(j.user_id, (SELECT value::integer FROM relayq_settings
                                          WHERE name = 'ordering_partitions')),
       j.state, j.attempts, blocker.job_id, j.retry_at, j.first_attempt_at, j.created_at,
       j.updated_at, j.user_id, j.message_id, j.error_code
FROM jobs_v1 j
JOIN migrated_jobs mj ON mj.old_id = j.job_id
LEFT JOIN migrated_jobs blocker ON blocker.old_id = j.blocked_by
WHERE j.state IN ('failed', 'waiting') OR j.attempts > 0;

INSERT INTO job_statuses (job_id, attempt, state, error_code, response, started_at,
                          duration_ms, retry_at, actor, reason, recorded_at, batch)
SELECT mj.job_id, s.attempt, s.state, s.error_code, s.response, s.started_at, s.duration_ms,
       s.retry_at, s.actor, s.reason, s.recorded_at, s.batch
FROM job_statuses_v1 s
JOIN migrated_jobs mj ON mj.old_id = s.job_id;

-- A database that had no jobs (a new install) keeps nothing of the old tables.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM jobs_v1) THEN
        DROP TABLE jobs_v1, job_statuses_v1;
        DROP SEQUENCE jobs_v1_job_id_seq;
    END IF;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Which connections a router's reads must see. Routers apply connections when they read
-- an event: a router that read an event sent after a connection was made, before it
-- reloaded its connections, would skip that event for the new destination for good. So
-- every read also returns this version, in its own snapshot, and a router whose
-- connections are older reloads them before it hands any event out. Bumped at commit (a
-- deferred trigger: the version row is the last lock a transaction takes, so it never
-- takes part in a deadlock), once per transaction.
-- ---------------------------------------------------------------------------------------

CREATE TABLE relayq_config_version (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    version  bigint NOT NULL,
    -- The transaction that bumped it last (each bumps it once).
    bumped_by  xid8
);

INSERT INTO relayq_config_version (version) VALUES (0);

CREATE FUNCTION relayq_config_bump() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE relayq_config_version
    SET version = version + 1, bumped_by = pg_current_xact_id()
    WHERE bumped_by IS DISTINCT FROM pg_current_xact_id();
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER connections_version AFTER INSERT OR UPDATE OR DELETE ON connections
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION relayq_config_bump();
