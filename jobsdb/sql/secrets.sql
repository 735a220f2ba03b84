-- Sealing secrets at rest (jobsdb/sealing.py): at the start of a router or admin service,
-- and `relayq secrets rekey`.

-- name: lock
-- One process seals or re-seals at a time (the others wait, then find nothing to do).
SELECT pg_advisory_xact_lock(hashtext('relayq:sealing'));

-- name: key_ids_in_use
-- The key ids of every sealed value (byte 2 to 5 of each).
SELECT DISTINCT substring(sealed FROM 2 FOR 4)
FROM destination_secrets WHERE sealed IS NOT NULL
UNION
SELECT substring(sealed_headers FROM 2 FOR 4)
FROM destinations WHERE sealed_headers IS NOT NULL
UNION
SELECT substring(sealed_endpoint FROM 2 FOR 4)
FROM destinations WHERE sealed_endpoint IS NOT NULL;

-- name: signing_secrets_to_seal
SELECT secret_id, secret, sealed FROM destination_secrets ORDER BY secret_id FOR UPDATE;

-- name: set_sealed_signing_secret
UPDATE destination_secrets SET secret = NULL, sealed = %(sealed)s
WHERE secret_id = %(secret_id)s;

-- name: destinations_to_seal
SELECT destination_key, endpoint, headers, sealed_endpoint, sealed_headers
FROM destinations ORDER BY destination_key FOR UPDATE;

-- name: set_sealed_destination
-- Not a configuration change for operators (updated_at stays); running routers reload all
-- the same, since the rows they read changed.
UPDATE destinations
SET endpoint = %(endpoint)s, sealed_endpoint = %(sealed_endpoint)s,
    headers = '{}', sealed_headers = %(sealed_headers)s
WHERE destination_key = %(destination_key)s;
