"""Structured logs: JSON lines in production, readable lines on a terminal.

Code logs with named loggers and lazy %-arguments, adding fields with `extra=`:

    log.info("job aborted", extra={"job_id": 42, "destination": "d1", "attempt": 3})

Only a process's main() calls `configure`; libraries never touch handlers.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from relayq.config import Env

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = fields(record)
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "text")


def configure_from_env(env: Env, every_record: dict[str, Any] | None = None) -> None:
    """RELAYQ_LOG_LEVEL (debug, info, warning, error) and RELAYQ_LOG_FORMAT (auto, json, text)."""
    configure(env.choice("RELAYQ_LOG_LEVEL", "info", LEVELS),
              env.choice("RELAYQ_LOG_FORMAT", "auto", FORMATS), every_record)


def configure(level: str = "info", fmt: str = "auto",
              every_record: dict[str, Any] | None = None) -> None:
    """fmt: 'json', 'text', or 'auto' (text on a terminal, JSON otherwise). `every_record`:
    fields every line carries (a worker's number, so that the lines of workers sharing one
    stderr can be told apart)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    if every_record:
        handler.addFilter(_Stamp(every_record))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _Stamp(logging.Filter):
    def __init__(self, stamp: dict[str, Any]) -> None:
        super().__init__()
        self._stamp = stamp

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self._stamp.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class Throttled:
    """A warning that anyone can cause (a client's bad request) is logged at most once per
    `interval` seconds, with how many were left out since the last one: a flood of bad
    requests must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._left_out = 0

    def warning(self, message: str, *args: object, extra: dict[str, Any] | None = None) -> bool:
        """Log unless one was logged less than `interval` ago; True if this one was."""
        now = self._clock()
        if now < self._next:
            self._left_out += 1
            return False
        fields = dict(extra or {})
        if self._left_out:
            fields["left_out"] = self._left_out
        self._logger.warning(message, *args, extra=fields)
        self._next = now + self._interval
        self._left_out = 0
        return True
