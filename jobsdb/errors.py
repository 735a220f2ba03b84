"""The Postgres layer's own error types, and the one function that translates driver errors.

Services map these to gRPC status codes (relayq.rpc); they never see psycopg exceptions.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import errors as pgerrors
from psycopg_pool import PoolTimeout


class JobsDBError(Exception):
    """Base class of every error raised by jobsdb."""


class DatabaseUnavailable(JobsDBError):
    """Postgres cannot be reached, or the pool had no connection in time. Safe to retry."""


class DatabaseFull(DatabaseUnavailable):
    """Postgres could not write for lack of disk space (SQLSTATE 53100). Nothing of the
    transaction happened; it passes once space returns, so it is retried like an outage."""


class DatabaseRefused(JobsDBError):
    """Postgres answered and refused us: the database does not exist, the password or role
    is wrong, pg_hba.conf has no entry, CONNECT is not granted. Waiting cannot help; the
    message is Postgres's own."""


class Conflict(DatabaseUnavailable):
    """Postgres rolled the transaction back to break a deadlock (or a serialization failure).
    Nothing of it happened; running it again is the remedy Postgres documents."""


class NotFound(JobsDBError):
    """A row the caller named does not exist (or is not visible to the caller's tenant)."""


class AlreadyExists(JobsDBError):
    """A unique key is taken."""


class InvalidReference(JobsDBError):
    """A foreign key names a row that does not exist."""


class ConstraintViolation(JobsDBError):
    """A value broke a CHECK or NOT NULL constraint."""


class MissingPartition(JobsDBError):
    """A job id fell outside every jobs partition; create partitions and try again."""


class QueryCanceled(JobsDBError):
    """A statement ran past its statement_timeout or lock_timeout."""


class SealError(JobsDBError):
    """A sealed secret that cannot be opened (jobsdb.sealing): a key not given, or a damaged
    value."""


class KeysRefused(SealError):
    """The database holds secrets sealed under keys this process was not given: a wrong or
    missing RELAYQ_SECRET_KEYS. Stops the process at start."""


def translate(exc: BaseException) -> JobsDBError:
    """Map a driver or pool exception to a jobsdb error. The only place that inspects them."""
    if isinstance(exc, JobsDBError):
        return exc
    if isinstance(exc, PoolTimeout):
        return DatabaseUnavailable(f"no database connection available: {exc}")
    if isinstance(exc, pgerrors.UniqueViolation):
        return AlreadyExists(_detail(exc))
    if isinstance(exc, pgerrors.ForeignKeyViolation):
        return InvalidReference(_detail(exc))
    if isinstance(exc, pgerrors.CheckViolation) and "no partition of relation" in str(exc):
        return MissingPartition(_detail(exc))
    if isinstance(exc, pgerrors.IntegrityError | pgerrors.DataError):
        return ConstraintViolation(_detail(exc))
    if isinstance(exc, pgerrors.DeadlockDetected | pgerrors.SerializationFailure):
        # Not the server's text: it names backend pids, transactions and relations.
        return Conflict(f"the transaction was rolled back to break a lock conflict"
                        f" ({exc.sqlstate}); nothing of it happened, try again")
    if isinstance(exc, pgerrors.QueryCanceled | pgerrors.LockNotAvailable):
        return QueryCanceled(_detail(exc))
    if isinstance(exc, pgerrors.DiskFull):
        # Not the server's text: it names the database's files.
        return DatabaseFull("the database is out of disk space: nothing of this was stored;"
                            " try again once it has room")
    refusal = _refusal(exc)
    if refusal is not None:
        return DatabaseRefused(f"Postgres refused the connection: {refusal}")
    if isinstance(
        exc,
        psycopg.OperationalError
        | pgerrors.AdminShutdown
        | pgerrors.CannotConnectNow
        | pgerrors.ConnectionException,
    ):
        if _TOO_MANY.search(str(exc)):
            return DatabaseUnavailable(
                "database unavailable: Postgres refuses new connections, every one of its"
                " max_connections is taken (too many clients); try again")
        return DatabaseUnavailable(f"database unavailable: {exc}")
    if isinstance(exc, psycopg.InterfaceError):
        return DatabaseUnavailable(f"database connection lost: {exc}")
    return JobsDBError(f"{type(exc).__name__}: {exc}")


# A failed connection attempt reaches us without its SQLSTATE: libpq keeps only the text of
# the server's FATAL error (psycopg's sqlstate is None there), so this is the one place that
# reads an error's text. The server refused, and will again, unless it said it is starting,
# stopping or recovering (57P03), or full (53300): those pass, and are retried.
_SERVER_REFUSAL = re.compile(r"\bFATAL:\s+(.*)$", re.MULTILINE)
_PASSING = re.compile(
    r"the database system is (starting up|shutting down|in recovery mode|not yet accepting"
    r"|not accepting)|too many (clients|connections)|connection slots are reserved"
    r"|out of memory")
_TOO_MANY = re.compile(r"too many (clients|connections)|connection slots are reserved")
# libpq's own words for a password the server asked for and was not given.
_NO_PASSWORD = "fe_sendauth: no password supplied"


def _refusal(exc: BaseException) -> str | None:
    """The server's reason, when `exc` is a connection it refused for good; else None."""
    if not isinstance(exc, psycopg.OperationalError) or exc.sqlstate is not None:
        return None
    text = str(exc)
    if _NO_PASSWORD in text:
        return _NO_PASSWORD
    match = _SERVER_REFUSAL.search(text)
    if match is None or _PASSING.search(match.group(1)):
        return None
    return match.group(1).strip()


def _detail(exc: psycopg.Error) -> str:
    diag = exc.diag
    return diag.message_detail or diag.message_primary or str(exc)
