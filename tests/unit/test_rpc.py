"""The one mapping from errors to gRPC statuses (relayq.rpc)."""

from __future__ import annotations

import grpc
from psycopg import errors as pgerrors

from jobsdb import errors
from relayq.rpc import status_of


def test_each_database_error_has_its_status_and_a_conflict_is_aborted() -> None:
    conflict = errors.translate(pgerrors.DeadlockDetected("deadlock detected"))
    code, message, _ = status_of(conflict)
    assert code is grpc.StatusCode.ABORTED  # not UNAVAILABLE, though it is one to retry on
    assert "try again" in message
    assert status_of(errors.DatabaseUnavailable("down"))[0] is grpc.StatusCode.UNAVAILABLE


def test_a_full_disk_and_taken_connections_are_said_plainly() -> None:
    import psycopg

    from jobsdb import health

    full = errors.translate(pgerrors.DiskFull(
        'could not extend file "base/16384/16390": No space left on device'))
    assert isinstance(full, errors.DatabaseUnavailable)  # retried as an outage is
    code, message, _ = status_of(full)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of disk space" in message
    assert "base/" not in message  # the database's files are not the client's business
    taken = errors.translate(psycopg.OperationalError(
        'connection failed: FATAL:  sorry, too many clients already'))
    code, message, _ = status_of(taken)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert "max_connections" in message
    watched = health.DatabaseHealth()
    assert watched.problem() is None
    watched.failed(errors.NotFound("a request's own mistake"))
    assert watched.problem() is None
    watched.failed(full)
    assert watched.problem() == str(full)
