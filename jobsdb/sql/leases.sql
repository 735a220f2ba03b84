-- name: heartbeat
-- Say this router is alive, and learn how many routers are (itself included).
WITH me AS (
    INSERT INTO router_nodes (router_id, expires_at)
    VALUES (%(router_id)s, now() + %(lease)s)
    ON CONFLICT (router_id) DO UPDATE
        SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at
    RETURNING router_id
)
SELECT 1 + count(*) AS live_routers,
       (SELECT count(*) FROM router_leases) AS partitions,
       now() AS at
FROM router_nodes
WHERE expires_at > now()
  AND router_id <> %(router_id)s;

-- name: renew
-- Extend this router's leases; returns what it still owns. A partition whose lease ran out
-- and was taken by another router is simply not returned. One whose lease ran out while
-- nobody took it (the router could not reach Postgres for longer than the lease) is still its
-- own, renewed like the others: its writes are fenced by owner, not expiry (eventlog.sql), so
-- what it did meanwhile is on record and what it knows of the partition is still true; it
-- stopped delivering at its own deadline all the same (router_service.membership). The owner
-- changes only through acquire (another router's, or this one's after a release): an acquire
-- passes by a row this is renewing (SKIP LOCKED), and a renewal that waited for an acquire's
-- FOR UPDATE re-reads the row once that commits and finds another owner: never two owners.
UPDATE router_leases
SET expires_at = now() + %(lease)s
WHERE owner = %(router_id)s
RETURNING partition;

-- name: acquire
-- Take up to `wanted` partitions that nobody holds (or whose holder's lease ran out). SKIP
-- LOCKED: routers acquiring at the same moment take different partitions instead of waiting.
UPDATE router_leases l
SET owner = %(router_id)s, expires_at = now() + %(lease)s, acquired_at = now()
FROM (
    SELECT partition
    FROM router_leases
    WHERE owner IS NULL OR expires_at <= now()
    ORDER BY partition
    LIMIT %(wanted)s
    FOR UPDATE SKIP LOCKED
) free
WHERE l.partition = free.partition
RETURNING l.partition;

-- name: release
-- Give partitions back (after this router finished what it had in flight for them).
UPDATE router_leases
SET owner = NULL, expires_at = NULL
WHERE owner = %(router_id)s
  AND partition = ANY(%(partitions)s::smallint[])
RETURNING partition;

-- name: leave
-- A clean shutdown: release everything at once and stop counting as alive.
WITH released AS (
    UPDATE router_leases SET owner = NULL, expires_at = NULL
    WHERE owner = %(router_id)s
    RETURNING partition
)
DELETE FROM router_nodes WHERE router_id = %(router_id)s;

-- name: forget_dead
-- Routers silent for a while are removed, so the live count stays honest.
DELETE FROM router_nodes WHERE expires_at < now() - interval '1 minute';

-- name: live_routers
-- Every router alive (heartbeated within its lease) and how many partitions it holds now.
SELECT n.router_id, n.started_at, n.heartbeat_at,
       (SELECT count(*) FROM router_leases l
        WHERE l.owner = n.router_id AND l.expires_at > now()) AS partitions
FROM router_nodes n
WHERE n.expires_at > now()
ORDER BY n.router_id;

-- name: owners
SELECT partition, owner, expires_at FROM router_leases ORDER BY partition;

-- name: claim_identity
-- A router's session holds this lock for as long as the router runs. Postgres drops it the
-- moment that session ends (a killed process's socket closes), so holding it proves that no
-- other live router uses the same id: a router restarted under its old id may take that id's
-- unexpired leases back at once instead of waiting them out.
SELECT pg_try_advisory_lock(%(namespace)s, hashtext(%(router_id)s));
