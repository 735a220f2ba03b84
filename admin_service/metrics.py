"""Prometheus metrics of relayq-admin (served on RELAYQ_ADMIN_METRICS_ADDRESS)."""

from prometheus_client import Counter

JOB_CHANGES = Counter(
    "relayq_admin_job_changes_total", "Jobs changed by operators.", ["action"])
