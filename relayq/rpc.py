"""Errors as types, mapped to gRPC status codes in one place.

Servicer methods raise `ServiceError` subclasses (or let jobsdb errors through); the
`handle_errors` decorator turns them into statuses. Nothing else calls context.abort.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from jobsdb import errors as dberrors

log = logging.getLogger(__name__)


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, violations: Sequence[tuple[str, str]] = (),
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # (field, description) pairs sent as google.rpc.BadRequest details.
        self.violations = tuple(violations)
        # Seconds the client should wait before trying again: a google.rpc.RetryInfo detail.
        self.retry_after = retry_after


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


# First match wins: a subclass goes before its base.
_DB_ERRORS: dict[type[dberrors.JobsDBError], grpc.StatusCode] = {
    dberrors.Conflict: grpc.StatusCode.ABORTED,
    # Before DatabaseUnavailable, which it is: "the entire file system is out of space" is
    # gRPC's own example of RESOURCE_EXHAUSTED. Clients retry both.
    dberrors.DatabaseFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    dberrors.DatabaseUnavailable: grpc.StatusCode.UNAVAILABLE,
    dberrors.DatabaseRefused: grpc.StatusCode.UNAVAILABLE,
    dberrors.MissingPartition: grpc.StatusCode.UNAVAILABLE,
    dberrors.NotFound: grpc.StatusCode.NOT_FOUND,
    dberrors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    dberrors.InvalidReference: grpc.StatusCode.FAILED_PRECONDITION,
    dberrors.ConstraintViolation: grpc.StatusCode.INVALID_ARGUMENT,
    dberrors.QueryCanceled: grpc.StatusCode.DEADLINE_EXCEEDED,
    # A destination's secrets sealed under a key this process was not given.
    dberrors.SealError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, Sequence[tuple[str, str]]]:
    """The status a failed RPC answers with. The one mapping from errors to codes."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.violations
    if isinstance(exc, dberrors.JobsDBError):
        for kind, code in _DB_ERRORS.items():
            if isinstance(exc, kind):
                return code, str(exc), ()
    return grpc.StatusCode.INTERNAL, "internal error (logged on the server)", ()


def to_status(code: grpc.StatusCode, message: str,
              violations: Sequence[tuple[str, str]], retry_after: float | None = None
              ) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_after))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if violations:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in violations
            ]
        )
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Method = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


def handle_errors(method: Method[Req, Resp]) -> Method[Req, Resp]:
    """Decorate a servicer method so its errors leave as gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await _abort(context, exc)
        except dberrors.JobsDBError as exc:
            log.warning("%s failed: %s", method.__name__, exc)
            await _abort(context, exc)
        except Exception as exc:
            # context.abort raises an internal exception type; let it pass untouched.
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("%s failed unexpectedly", method.__name__)
            await _abort(context, exc)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    code, message, violations = status_of(exc)
    retry_after = exc.retry_after if isinstance(exc, ServiceError) else None
    # abort_with_status exists on grpc.aio contexts; the grpc-stubs release lags behind.
    await context.abort_with_status(  # type: ignore[attr-defined]
        to_status(code, message, violations, retry_after))
    raise AssertionError("unreachable: abort_with_status raises")
