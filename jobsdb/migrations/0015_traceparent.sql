-- relayq schema 15: each event's W3C traceparent, so deliveries carry the sender's trace on.
--
-- Kept as the text ingest checked (version 00, 55 characters), NULL for the events sent
-- without one: a nullable column with no default is a catalog change only (no rewrite of
-- the log), and costs a NULL event nothing but its null bitmap bit. Routers read it with the
-- document and send it on (webhook and NATS header `traceparent`, gRPC Delivery.traceparent);
-- admin shows it on the event's jobs.
ALTER TABLE events ADD COLUMN traceparent text;
