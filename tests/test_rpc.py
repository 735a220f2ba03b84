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
