-- relayq schema 1: configuration, jobs with their append-only status log, de-duplication.
--
-- Applied by jobsdb.migrate under an advisory lock, in one transaction.

-- Cluster-wide settings fixed when the database is created.
CREATE TABLE relayq_settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

INSERT INTO relayq_settings (name, value) VALUES
    -- The ordering-key space ((destination, user) hashed) is cut into this many partitions;
    -- routers lease partitions, so no two routers ever deliver the same key at once.
    ('ordering_partitions', '64'),
    -- Jobs and their statuses live in tables of this many job ids each, dropped whole once
    -- every job in them is finished and older than the retention period.
    ('job_partition_size', '1000000');

-- ---------------------------------------------------------------------------------------
-- Configuration. Every entity has a public text id (what operators type) and an integer
-- key (what the hot tables store: jobs rows and their indexes stay narrow).
-- ---------------------------------------------------------------------------------------

CREATE TABLE tenants (
    tenant_key  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text NOT NULL UNIQUE CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sources (
    source_key  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          text NOT NULL UNIQUE CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    tenant_key  integer NOT NULL REFERENCES tenants,
    name        text NOT NULL DEFAULT '',
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX sources_tenant_idx ON sources (tenant_key);

-- Write keys are random 256-bit secrets, so a plain SHA-256 is enough to store them safely
-- (no salt or slow hash needed) and a lookup is one index probe. Rotation adds a key and
-- gives the old one an expiry, so clients can switch over without an outage.
CREATE TABLE write_keys (
    key_hash    bytea PRIMARY KEY,
    source_key  integer NOT NULL REFERENCES sources ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);

CREATE INDEX write_keys_source_idx ON write_keys (source_key);

CREATE TABLE destinations (
    destination_key     integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                  text NOT NULL UNIQUE CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    tenant_key          integer NOT NULL REFERENCES tenants,
    name                text NOT NULL DEFAULT '',
    type                text NOT NULL CHECK (type IN ('webhook', 'grpc')),
    endpoint            text NOT NULL,
    headers             jsonb NOT NULL DEFAULT '{}',
    min_backoff_ms      integer NOT NULL DEFAULT 1000 CHECK (min_backoff_ms > 0),
    max_backoff_ms      integer NOT NULL DEFAULT 300000 CHECK (max_backoff_ms >= min_backoff_ms),
    max_attempts        integer NOT NULL DEFAULT 10 CHECK (max_attempts > 0),
    max_retry_window_s  integer NOT NULL DEFAULT 10800 CHECK (max_retry_window_s >= 0),
    rate_per_second     double precision NOT NULL DEFAULT 0 CHECK (rate_per_second >= 0),
    rate_burst          integer NOT NULL DEFAULT 0 CHECK (rate_burst >= 0),
    concurrency         integer NOT NULL DEFAULT 64 CHECK (concurrency BETWEEN 1 AND 10000),
    timeout_ms          integer NOT NULL DEFAULT 30000 CHECK (timeout_ms BETWEEN 1 AND 600000),
    paused              boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX destinations_tenant_idx ON destinations (tenant_key);

CREATE TABLE connections (
    source_key       integer NOT NULL REFERENCES sources ON DELETE CASCADE,
    destination_key  integer NOT NULL REFERENCES destinations ON DELETE CASCADE,
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_key, destination_key)
);

CREATE INDEX connections_destination_idx ON connections (destination_key);

-- Tenant-scoped admin tokens (the operator token comes from configuration, not from here).
CREATE TABLE admin_tokens (
    token_hash  bytea PRIMARY KEY,
    id          text NOT NULL UNIQUE,
    tenant_key  integer NOT NULL REFERENCES tenants,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Running ingest and router processes cache configuration; any change to it wakes them
-- (one notification per statement, and Postgres folds repeats within a transaction).
CREATE FUNCTION relayq_config_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relayq_config', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tenants_changed AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();
CREATE TRIGGER sources_changed AFTER INSERT OR UPDATE OR DELETE ON sources
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();
CREATE TRIGGER write_keys_changed AFTER INSERT OR UPDATE OR DELETE ON write_keys
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();
CREATE TRIGGER destinations_changed AFTER INSERT OR UPDATE OR DELETE ON destinations
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();
CREATE TRIGGER connections_changed AFTER INSERT OR UPDATE OR DELETE ON connections
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();
CREATE TRIGGER admin_tokens_changed AFTER INSERT OR UPDATE OR DELETE ON admin_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION relayq_config_changed();

-- ---------------------------------------------------------------------------------------
-- Jobs.
--
-- One row per (event, destination), holding the job's current state, and an append-only
-- job_statuses log holding every attempt and operator action. rudder-server keeps jobs
-- immutable and derives the state from the latest status row; we keep the state on the job
-- instead, because then "what is runnable for destination d, in job order" is one scan of a
-- small partial index (only unfinished jobs are in it) rather than a join against the status
-- log, and because operators' state changes become compare-and-set updates that cannot race
-- a router. The price is one UPDATE per attempt; dead tuples go away with the partition.
--
-- Both tables are partitioned by job_id range (jobsdb.partitions creates partitions ahead of
-- the sequence and drops finished ones), so storage is reclaimed by DROP, not DELETE+VACUUM.
-- ---------------------------------------------------------------------------------------

-- 'executing' is deliberately not a stored state: routers lease whole partitions of the
-- ordering-key space, so writing a per-job lease would double the writes of every delivery
-- (measured: 20k -> 12k jobs/s) for no gain in safety. RouterStatus reports what is in flight.
CREATE TYPE job_state AS ENUM ('pending', 'failed', 'waiting', 'succeeded', 'aborted');

-- CACHE 1 (the default) matters: ids must follow the order in which ingest transactions ask
-- for them, across processes, or a user's later event could get a smaller id than an earlier
-- one sent through another ingest process. A per-session cache would break that.
CREATE SEQUENCE jobs_job_id_seq AS bigint CACHE 1;

CREATE TABLE jobs (
    job_id              bigint NOT NULL,
    destination_key     integer NOT NULL,
    tenant_key          integer NOT NULL,
    source_key          integer NOT NULL,
    ordering_partition  smallint NOT NULL,
    state               job_state NOT NULL DEFAULT 'pending',
    attempts            integer NOT NULL DEFAULT 0,
    blocked_by          bigint,
    retry_at            timestamptz,
    first_attempt_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    user_id             text NOT NULL,
    message_id          text NOT NULL,
    error_code          text,
    payload             jsonb NOT NULL,
    PRIMARY KEY (job_id)
) PARTITION BY RANGE (job_id);

-- The router's pickup: pending jobs of a destination in job order ...
CREATE INDEX jobs_pending_idx ON jobs (destination_key, job_id) WHERE state = 'pending';
-- ... and failed jobs whose retry time has come, found by time so that jobs still backing
-- off are never read.
CREATE INDEX jobs_failed_idx ON jobs (destination_key, retry_at) WHERE state = 'failed';
-- The ordering barrier: the earliest failed or waiting job of a (destination, user) holds
-- every later job of that key. Also what operators query most (what is stuck, and why).
CREATE INDEX jobs_held_idx ON jobs (destination_key, user_id, job_id)
    WHERE state IN ('failed', 'waiting');
-- Releasing a barrier: the jobs waiting behind a job that just ended.
CREATE INDEX jobs_waiting_idx ON jobs (blocked_by) WHERE state = 'waiting';
-- Time-range queries; jobs arrive in created_at order, so a BRIN index is tiny and cheap.
CREATE INDEX jobs_created_brin ON jobs USING brin (created_at);

CREATE TABLE job_statuses (
    job_id       bigint NOT NULL,
    attempt      integer NOT NULL,
    state        job_state NOT NULL,
    error_code   text,
    -- Cut to about 10 KB by the writer: rudder-server saw endless vacuums from huge responses.
    response     text,
    started_at   timestamptz NOT NULL,
    duration_ms  integer,
    retry_at     timestamptz,
    -- 'router:<id>' or 'admin:<token id>'.
    actor        text NOT NULL,
    reason       text,
    recorded_at  timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (job_id);

CREATE INDEX job_statuses_job_idx ON job_statuses (job_id);

-- ---------------------------------------------------------------------------------------
-- De-duplication of (source, message_id), shared by every ingest process.
--
-- Keys live in generations (list partitions). A key is a duplicate if it is in any
-- generation still inside the window; expired generations are dropped whole. Every ingest
-- transaction holds a shared advisory lock while it checks and inserts keys, and rotation
-- takes it exclusively, so two processes can never put the same key into two different
-- generations unseen by each other.
-- ---------------------------------------------------------------------------------------

CREATE TABLE dedup_generations (
    generation  integer PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dedup_keys (
    source_key  integer NOT NULL,
    message_id  text NOT NULL,
    generation  integer NOT NULL,
    PRIMARY KEY (source_key, message_id, generation)
) PARTITION BY LIST (generation);

CREATE TABLE dedup_keys_g1 PARTITION OF dedup_keys FOR VALUES IN (1);
INSERT INTO dedup_generations (generation) VALUES (1);
