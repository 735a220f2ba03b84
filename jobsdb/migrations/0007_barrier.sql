-- relayq schema 7: the ordering barrier, written once.
--
-- A job is held back by the earliest failed or waiting job of its ordering key (destination,
-- user) that comes before it; a waiting job points at its own root blocker, so the holder is
-- that root. The router's pickup (sql/queue.sql) and the admin's peek (sql/jobs.sql) both ask
-- this function, so what an operator is shown as blocking a job is what the router obeys.
--
-- A set-returning SQL function that is STABLE, not STRICT and has no SET clause is inlined
-- by the planner into the calling query (a LATERAL join on jobs_held_idx), so it costs what
-- the subquery it replaces did. Parameter names differ from every column name on purpose:
-- in an SQL function a column of the same name would win.
CREATE FUNCTION job_holder(of_destination integer, of_user text, before_job bigint)
RETURNS TABLE (holder bigint)
LANGUAGE sql STABLE
AS $$
    -- Never its own holder: an older job an operator retried can be waiting behind this one,
    -- and then this one goes first.
    SELECT nullif(coalesce(h.blocked_by, h.job_id), before_job)
    FROM jobs h
    WHERE h.destination_key = of_destination
      AND h.user_id = of_user
      AND h.state IN ('failed', 'waiting')
      AND h.job_id < before_job
    ORDER BY h.job_id
    LIMIT 1
$$;
