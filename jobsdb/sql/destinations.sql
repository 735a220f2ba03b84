-- name: load_all
-- Every destination with what the router needs to deliver to it, and its webhook signing
-- secrets in force, newest first (router_service.signing signs with each; secrets are read
-- nowhere else). Read whole on start and whenever a digest of this very statement changes
-- (jobsdb.destinations.load_if_changed). One statement, so one snapshot: a destination is
-- never loaded without the secret it was created with.
-- Secrets come sealed (jobsdb.sealing); one stored before sealing existed, in clear, until
-- a process with the keys seals it.
SELECT d.*,
       coalesce(s.secrets, '{}') AS secrets,
       coalesce(s.sealed_secrets, '{}') AS sealed_secrets,
       coalesce(s.expiries, '{}') AS expiries
FROM destination_rows d
LEFT JOIN (
    SELECT destination_key,
           array_agg(secret ORDER BY secret_id DESC) AS secrets,
           array_agg(sealed ORDER BY secret_id DESC) AS sealed_secrets,
           array_agg(expires_at ORDER BY secret_id DESC) AS expiries
    FROM destination_secrets
    WHERE expires_at IS NULL OR expires_at > now()
    GROUP BY destination_key
) s ON s.destination_key = d.destination_key
ORDER BY d.destination_key;

-- name: load_connections
-- Every enabled connection, with its number within its source (its jobs' ids' low bits) and
-- its event filter: what a router needs to fan out the events it reads from the log. A
-- backfilled one takes from the log only the events after `backfill_after`, and none at all
-- while its backfill's rows are still being written (migration 0017, jobsdb.replays).
SELECT c.source_key, c.destination_key, c.slot, c.event_filter,
       coalesce(c.backfill_after, 0) AS backfill_after,
       EXISTS (SELECT 1 FROM replays r
               WHERE r.destination_key = c.destination_key AND r.source_key = c.source_key
                 AND r.kind = 'backfill' AND r.state = 'running') AS backfilling
FROM connections c
WHERE c.enabled
ORDER BY c.source_key, c.destination_key;
