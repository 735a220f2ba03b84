-- relayq schema 4: a rate limit per source, enforced by ingest.
--
-- A source sending far more than it should (a runaway client, a replay gone wrong) is told
-- RESOURCE_EXHAUSTED at the door instead of filling the queue that every tenant's
-- destinations share. 0 means unlimited, as for destinations.
ALTER TABLE sources
    ADD COLUMN rate_per_second double precision NOT NULL DEFAULT 0
        CHECK (rate_per_second >= 0),
    ADD COLUMN rate_burst integer NOT NULL DEFAULT 0 CHECK (rate_burst >= 0);
