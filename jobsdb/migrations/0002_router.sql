-- relayq schema 2: routers and their leases on the ordering-key space.
--
-- Every router heartbeats a row in router_nodes; the number of live rows tells each router its
-- fair share of partitions (ceil(partitions / live routers)). A partition belongs to at most
-- one router at a time, until its lease expires: so no (destination, user) key is ever
-- delivered by two routers at once, and a dead router's share moves to the others once its
-- leases run out.

CREATE TABLE router_nodes (
    router_id     text PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);

CREATE TABLE router_leases (
    partition    smallint PRIMARY KEY,
    owner        text,
    expires_at   timestamptz,
    acquired_at  timestamptz
);

INSERT INTO router_leases (partition)
SELECT generate_series(0, value::integer - 1)
FROM relayq_settings
WHERE name = 'ordering_partitions';
