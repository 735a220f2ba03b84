-- relayq schema 8: a connection takes only the events its filter matches.
--
-- The filter is the operator's text in the filter language over the event (jobsdb.event_filters),
-- checked by the admin service before it is stored; NULL means every event. Ingest compiles
-- it when it loads the source's route (the connections trigger already notifies relayq_config,
-- so running ingest processes reload within moments).
ALTER TABLE connections ADD COLUMN event_filter text;

-- Events a connection's filter kept out, for GetStats: counted by the ingest transaction that
-- stored (or refused to store) them, so a retried batch whose events are duplicates counts
-- nothing twice, and counts and jobs cannot disagree.
--
-- Unlike delivery_counts, a row is per writing backend too (pg_backend_pid() of the ingest
-- connection): concurrent group commits of one source would otherwise all update the same
-- (connection, bucket) row, and each would wait for the other's commit, undoing the overlap
-- of commits that ingest's flush concurrency is for. A backend runs one transaction at a time,
-- so no two transactions ever write the same row. Maintenance folds buckets older than ten
-- minutes into one ('-infinity', backend 0) row per connection.
CREATE TABLE connection_counts (
    source_key       integer NOT NULL,
    destination_key  integer NOT NULL,
    bucket           timestamptz NOT NULL,
    backend          integer NOT NULL,
    filtered         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (source_key, destination_key, bucket, backend)
);
