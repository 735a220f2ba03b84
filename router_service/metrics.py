"""Prometheus metrics of relayq-router (served on RELAYQ_ROUTER_METRICS_ADDRESS).

Per-destination labels only on counters: a histogram per destination would be tens of series
per destination, too many with thousands of them.
"""

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

ATTEMPTS = Counter(
    "relayq_router_deliveries_total",
    "Delivery attempts by destination and outcome (ok, retry, abort).",
    ["destination", "outcome"],
)
DELIVERY_SECONDS = Histogram(
    "relayq_router_delivery_seconds", "Time a destination took to answer, by destination type.",
    ["type"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
END_TO_END_SECONDS = Histogram(
    "relayq_router_end_to_end_seconds",
    "From the job's creation (ingest commit) to the destination's success answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """Observe many amounts at once: what `observe` does for each, with a lock taken per
    bucket touched rather than two per amount (the end-to-end time is observed for every job
    delivered, tens of thousands a second). It reaches into the histogram's buckets, which
    prometheus_client does not promise to keep: tests/unit/test_metrics.py checks that it
    matches `observe`, so an upgrade that changes them fails there rather than in production."""
    if not amounts:
        return
    bounds = histogram._upper_bounds
    counts: dict[int, int] = {}
    for amount in amounts:
        index = bisect_left(bounds, amount)
        counts[index] = counts.get(index, 0) + 1
    histogram._sum.inc(sum(amounts))
    buckets = histogram._buckets
    for index, count in counts.items():
        buckets[index].inc(count)


# With workers (RELAYQ_ROUTER_WORKERS) the supervisor serves every worker's metrics as one:
# counters and histograms add up by themselves; a gauge says how (multiprocess_mode), over the
# workers alive: in flight and partitions add up, every worker knows every destination.
IN_FLIGHT = Gauge("relayq_router_in_flight", "Deliveries in flight.", multiprocess_mode="livesum")
PARTITIONS_OWNED = Gauge(
    "relayq_router_partitions_owned", "Partitions of the ordering-key space this router holds.",
    multiprocess_mode="livesum")
DESTINATIONS = Gauge("relayq_router_destinations", "Destinations known to this router.",
                     multiprocess_mode="livemax")
PICKUP_JOBS = Histogram(
    "relayq_router_pickup_jobs", "Jobs returned by one read of a destination's queue.",
    buckets=(0, 1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
PICKUP_STATEMENTS = Counter(
    "relayq_router_pickup_statements_total",
    "Statements that read runnable jobs: 'alone' for one busy destination, 'grouped' for the"
    " waiting reads of many.", ["kind"],
)
FLUSH_ITEMS = Histogram(
    "relayq_router_flush_items", "Outcomes and parkings recorded by one transaction.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
)
FLUSH_SECONDS = Histogram(
    "relayq_router_flush_seconds", "Duration of a transaction recording outcomes.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
HEARTBEAT_TIMEOUTS = Counter(
    "relayq_router_heartbeat_timeouts_total",
    "Heartbeats given up on because Postgres did not answer within an interval.")
ABANDONED = Counter(
    "relayq_router_abandoned_deliveries_total",
    "Deliveries cancelled in flight because the router's lease could no longer be proven"
    " (their jobs are delivered again by whoever owns their partition next).")
UNRECORDABLE = Counter(
    "relayq_router_unrecordable_outcomes_total",
    "Outcomes Postgres refused for their content, recorded again with a safe error text"
    " ('sanitised'), or refused even so ('refused': the jobs stay held until a restart).",
    ["how"])
CIRCUITS_OPEN = Gauge(
    "relayq_router_circuits_open",
    "Destinations whose circuit is open (every attempt failed for a while): only probed.",
    multiprocess_mode="livemax")
CIRCUIT_CHANGES = Counter(
    "relayq_router_circuit_changes_total",
    "Circuits this router opened (every attempt failing) or closed (a probe succeeded).",
    ["to"])
LOOP_LAG = Histogram(
    "relayq_router_loop_lag_seconds",
    "How late the router's event loop ran a timer: its queue of work. While it runs late and"
    " several tenants deliver, the heaviest is held back (router_service.fairness).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))

LOG_READ_EVENTS = Histogram(
    "relayq_router_log_read_events", "Events per shared read of the event log.",
    buckets=(0, 1, 10, 50, 100, 500, 1000, 5000, 20000),
)
LOG_LAGGING = Gauge(
    "relayq_router_log_lagging", "Destination-partitions reading the event log on their own"
    " (paused, circuit open, slow).", multiprocess_mode="livesum")
CURSOR_WRITES = Counter(
    "relayq_router_cursor_writes_total", "Transactions that moved frontiers or cursors.")
FILTERED = Counter(
    "relayq_router_filtered_events_total",
    "Events a connection's filter kept from its destination, by destination id.",
    ["destination"],
)
REPLAY_ROWS = Counter(
    "relayq_router_replay_rows_total",
    "Job rows replays and backfills wrote (router_service.replays), by kind.",
    ["kind"],
)
