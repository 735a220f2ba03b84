-- relayq schema 17: replays and backfills (issue 18).
--
-- A replay sends a source's logged events in a range (ids or times, and a filter over the
-- event's fields) to one destination again, whatever became of them there. A backfill gives
-- a newly connected destination the source's retained events from a time on. Both are an
-- operator's action, so both are written as job rows (the row path delivers them, in job
-- order per user, with retries and the barrier), made a chunk at a time by a router's replay
-- worker (router_service/replays.py) and recorded here with their progress and their audit.

CREATE TYPE replay_state AS ENUM ('running', 'done', 'cancelled');

CREATE TABLE replays (
    replay_id        text PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('replay', 'backfill')),
    tenant_key       integer NOT NULL,
    source_key       integer NOT NULL,
    destination_key  integer NOT NULL REFERENCES destinations ON DELETE CASCADE,
    -- The events it takes: ids in (after, last], created in [from_time, to_time) (NULL: no
    -- bound), matching `filter` (the connection filter language; NULL: every event).
    after_event_id   bigint NOT NULL,
    last_event_id    bigint NOT NULL,
    from_time        timestamptz,
    to_time          timestamptz,
    filter           text,
    state            replay_state NOT NULL DEFAULT 'running',
    -- Events the dry run counted when it was made; jobs written so far; and how far the
    -- worker has gone (every event of the range at or below it is written).
    matched          bigint NOT NULL,
    written          bigint NOT NULL DEFAULT 0,
    position         bigint NOT NULL,
    actor            text NOT NULL,
    reason           text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    cancelled_by     text
);

CREATE INDEX replays_running_idx ON replays (created_at) WHERE state = 'running';
CREATE INDEX replays_destination_idx ON replays (destination_key, created_at);

-- The rows a replay wrote: its progress is what of them is still unfinished.
ALTER TABLE jobs ADD COLUMN replay_id text;
CREATE INDEX jobs_replay_idx ON jobs (replay_id, state) WHERE replay_id IS NOT NULL;

-- A backfilled connection takes from the log only the events after this id; the backfill
-- writes rows for the ones at or before it (NULL: every event the routers read).
ALTER TABLE connections ADD COLUMN backfill_after bigint;

-- A replay or backfill starting, ending or cancelled changes what routers hold back: they
-- reload (a backfill's destination takes nothing from the log until its rows are written).
CREATE CONSTRAINT TRIGGER replays_version AFTER INSERT OR UPDATE OF state OR DELETE ON replays
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION relayq_config_bump();

CREATE FUNCTION replays_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relayq_config', '');
    PERFORM pg_notify('relayq_replays', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER replays_changed AFTER INSERT OR UPDATE OF state ON replays
    FOR EACH STATEMENT EXECUTE FUNCTION replays_notify();
