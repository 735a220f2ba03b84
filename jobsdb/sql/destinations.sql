-- name: load_all
-- Every destination with what the router needs to deliver to it. Read whole on start and on
-- every configuration change: ten thousand rows are one quick query.
SELECT *
FROM destination_rows
ORDER BY destination_key;
