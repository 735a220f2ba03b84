-- name: load_all
-- Every destination with what the router needs to deliver to it. Read whole on start and on
-- every configuration change: ten thousand rows are one quick query.
SELECT *
FROM destination_rows
ORDER BY destination_key;

-- name: load_signing_secrets
-- Every webhook signing secret in force, newest first per destination (router_service.signing
-- signs with each). Secrets are read nowhere else.
SELECT destination_key, secret, expires_at
FROM destination_secrets
WHERE expires_at IS NULL OR expires_at > now()
ORDER BY destination_key, secret_id DESC;
