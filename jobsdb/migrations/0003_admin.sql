-- relayq schema 3: what the admin service reads for GetStats.
--
-- Counting terminal jobs (succeeded, aborted) in a table of millions of rows is a full scan,
-- and "recent delivery rate" would need an index on every status row's time. Instead, every
-- statement that ends or fails jobs adds its counts to a 10-second bucket of its destination
-- (one upsert per destination per batch, inside the statement that moves the jobs, so counts
-- and states cannot disagree). Maintenance folds buckets older than ten minutes into one
-- '-infinity' row per destination, so a destination never has more than ~61 rows here.
CREATE TABLE delivery_counts (
    destination_key  integer NOT NULL,
    bucket           timestamptz NOT NULL,
    succeeded        bigint NOT NULL DEFAULT 0,
    failed           bigint NOT NULL DEFAULT 0,
    aborted          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (destination_key, bucket)
);
