"""Rows from jobsdb to relayq.v1 messages. Pure functions, one per message."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

import orjson
from google.protobuf import struct_pb2, timestamp_pb2

from jobsdb import catalog, eventlog
from jobsdb import events as eventsdb
from jobsdb import jobs as jobsdb
from jobsdb import replays as jobsdb_replays
from jobsdb.keyspace import event_of
from relayq.v1 import admin_pb2, common_pb2

STATES = {
    "pending": common_pb2.JOB_STATE_PENDING,
    "failed": common_pb2.JOB_STATE_FAILED,
    "waiting": common_pb2.JOB_STATE_WAITING,
    "succeeded": common_pb2.JOB_STATE_SUCCEEDED,
    "aborted": common_pb2.JOB_STATE_ABORTED,
}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None or value.year < 1971:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def tenant(row: catalog.Tenant) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(id=row.id, name=row.name, created_at=timestamp(row.created_at))


def source(row: catalog.Source) -> admin_pb2.Source:
    return admin_pb2.Source(id=row.id, tenant_id=row.tenant_id, name=row.name,
                            enabled=row.enabled, created_at=timestamp(row.created_at),
                            rate_limit=common_pb2.RateLimit(per_second=row.rate_per_second,
                                                            burst=row.rate_burst))


def destination(row: catalog.Destination) -> admin_pb2.DestinationConfig:
    return admin_pb2.DestinationConfig(
        id=row.id, tenant_id=row.tenant_id, name=row.name, type=row.type,
        endpoint=row.endpoint,
        retry_policy=common_pb2.RetryPolicy(
            min_backoff_ms=row.min_backoff_ms, max_backoff_ms=row.max_backoff_ms,
            max_attempts=row.max_attempts, max_retry_window_seconds=row.max_retry_window_s),
        rate_limit=common_pb2.RateLimit(per_second=row.rate_per_second, burst=row.rate_burst),
        concurrency=row.concurrency, timeout_ms=row.timeout_ms, paused=row.paused,
        headers=row.headers, created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        circuit_policy=admin_pb2.CircuitPolicy(
            open_after_seconds=row.circuit_after_s, min_failures=row.circuit_min_failures,
            probe_every_seconds=row.circuit_probe_s, disabled=row.circuit_after_s == 0),
        circuit=circuit(row.circuit_opened_at, row.circuit_reason),
        batch_policy=admin_pb2.BatchPolicy(max_events=row.batch_max_events,
                                           max_bytes=row.batch_max_bytes,
                                           linger_ms=row.batch_linger_ms),
    )


def circuit(opened_at: datetime | None, reason: str | None) -> admin_pb2.Circuit:
    return admin_pb2.Circuit(open=opened_at is not None, opened_at=timestamp(opened_at),
                             reason=reason or "")


def connection(row: catalog.Connection) -> admin_pb2.Connection:
    return admin_pb2.Connection(source_id=row.source_id, destination_id=row.destination_id,
                                enabled=row.enabled, created_at=timestamp(row.created_at),
                                filter=row.filter, slot=row.slot)


def admin_token(row: catalog.AdminToken) -> admin_pb2.AdminToken:
    return admin_pb2.AdminToken(id=row.id, tenant_id=row.tenant_id, name=row.name,
                                created_at=timestamp(row.created_at),
                                revoked_at=timestamp(row.revoked_at))


def job(row: jobsdb.JobRow, history: Sequence[jobsdb.StatusRow] = ()) -> common_pb2.Job:
    message = common_pb2.Job(
        job_id=row.job_id, tenant_id=row.tenant_id, source_id=row.source_id,
        destination_id=row.destination_id, user_id=row.user_id, message_id=row.message_id,
        state=STATES[row.state], attempts=row.attempts, retry_at=timestamp(row.retry_at),
        blocked_by=row.blocked_by or 0, error_code=row.error_code or "",
        created_at=timestamp(row.created_at), updated_at=timestamp(row.updated_at),
        first_attempt_at=timestamp(row.first_attempt_at),
        history=[status(s) for s in history], traceparent=row.traceparent or "",
    )
    if row.payload is not None:
        message.payload.CopyFrom(payload(row.payload))
    return message


def payload(text: str) -> struct_pb2.Struct:
    document = struct_pb2.Struct()
    document.update(orjson.loads(text))
    return document


def status(row: jobsdb.StatusRow) -> common_pb2.JobStatus:
    return common_pb2.JobStatus(
        attempt=row.attempt, state=STATES[row.state], error_code=row.error_code or "",
        response=row.response or "", started_at=timestamp(row.started_at),
        duration_ms=row.duration_ms or 0, retry_at=timestamp(row.retry_at), actor=row.actor,
        reason=row.reason or "", batch_id=row.batch or "")


def logged_event(row: eventsdb.EventRow) -> admin_pb2.LoggedEvent:
    message = admin_pb2.LoggedEvent(
        event_id=row.event_id, tenant_id=row.tenant_id, source_id=row.source_id,
        user_id=row.user_id, message_id=row.message_id, created_at=timestamp(row.created_at),
        destination_ids=row.destination_ids)
    if row.document is not None:
        message.payload.CopyFrom(payload(row.document))
    return message


EVENT_STATUSES = {
    "pending": admin_pb2.EVENT_STATUS_PENDING,
    "delivered": admin_pb2.EVENT_STATUS_DELIVERED,
    "failed": admin_pb2.EVENT_STATUS_FAILED,
    "waiting": admin_pb2.EVENT_STATUS_WAITING,
    "aborted": admin_pb2.EVENT_STATUS_ABORTED,
    "filtered_out": admin_pb2.EVENT_STATUS_FILTERED_OUT,
    "not_connected": admin_pb2.EVENT_STATUS_NOT_CONNECTED,
}


def at_destination(row: eventsdb.AtDestination) -> admin_pb2.EventAtDestination:
    message = admin_pb2.EventAtDestination(destination_id=row.destination_id,
                                           status=EVENT_STATUSES[row.status], reason=row.reason)
    if row.job is not None:
        # The event's document is the event's, shown once.
        message.job.CopyFrom(job(dataclasses.replace(row.job, payload=None), row.history))
        if row.status == "waiting" and row.job.blocked_by:
            message.waiting_behind_job_id = row.job.blocked_by
            message.waiting_behind_event_id = event_of(row.job.blocked_by)
    return message


def event_log(size: eventlog.LogSize) -> admin_pb2.EventLogStats:
    if size.oldest is None:
        return admin_pb2.EventLogStats(bytes=size.bytes, events=size.events)
    return admin_pb2.EventLogStats(bytes=size.bytes, events=size.events,
                                   oldest_event_id=size.oldest[0],
                                   oldest_event_at=timestamp(size.oldest[1]))

def replay(row: jobsdb_replays.Replay) -> admin_pb2.Replay:
    return admin_pb2.Replay(
        replay_id=row.replay_id, kind=row.kind, tenant_id=row.tenant_id,
        source_id=row.source_id, destination_id=row.destination_id,
        first_event_id=row.after_event_id + 1, last_event_id=max(row.last_event_id, 0),
        from_time=timestamp(row.from_time), to_time=timestamp(row.to_time), filter=row.filter,
        state=row.state, matched=row.matched, written=row.written,
        delivered=max(0, row.written - row.unfinished - row.aborted), pending=row.unfinished,
        aborted=row.aborted, position=max(row.position, 0), actor=row.actor, reason=row.reason,
        created_at=timestamp(row.created_at), finished_at=timestamp(row.finished_at),
        cancelled_by=row.cancelled_by)
