-- name: lock_rotation
-- Waits for every ingest transaction in flight (they hold the lock shared) and keeps new ones
-- out until this transaction ends.
SELECT pg_advisory_xact_lock(%(lock)s);

-- name: generations
SELECT generation, started_at, now() - started_at AS age FROM dedup_generations ORDER BY generation;

-- name: add_generation
INSERT INTO dedup_generations (generation) VALUES (%(generation)s);

-- name: forget_generation
DELETE FROM dedup_generations WHERE generation = %(generation)s;
