"""Prometheus metrics of relayq-ingest (served on RELAYQ_INGEST_METRICS_ADDRESS)."""

from prometheus_client import Counter, Histogram

EVENTS = Counter(
    "relayq_ingest_events_total", "Events received, by outcome.", ["outcome"]
)
REJECTS = Counter(
    "relayq_ingest_rejects_total",
    "Requests or events refused, by reason (auth, batch, event, rate).", ["reason"]
)
IGNORED_TRACEPARENTS = Counter(
    "relayq_ingest_ignored_traceparents_total",
    "Requests whose metadata traceparent was malformed and ignored (their events were"
    " stored without it, unless they carried their own).",
)
BATCH_EVENTS = Histogram(
    "relayq_ingest_batch_events", "Events per Ingest request.",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
)
# Named for jobs before the event log; one row per event now.
FLUSH_JOBS = Histogram(
    "relayq_ingest_flush_jobs", "Events per group-commit transaction.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
FLUSH_SECONDS = Histogram(
    "relayq_ingest_flush_seconds", "Duration of a group-commit transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def flushed(jobs: int, seconds: float) -> None:
    FLUSH_JOBS.observe(jobs)
    FLUSH_SECONDS.observe(seconds)
