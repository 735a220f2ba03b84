"""Structured logs: JSON lines in production, readable lines on a terminal.

Code logs with named loggers and lazy %-arguments, adding fields with `extra=`:

    log.info("job aborted", extra={"job_id": 42, "destination": "d1", "attempt": 3})

Only a process's main() calls `configure`; libraries never touch handlers.
"""

from __future__ import annotations

import logging
import sys
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


def configure_from_env(env: Env) -> None:
    """RELAYQ_LOG_LEVEL (debug, info, warning, error) and RELAYQ_LOG_FORMAT (auto, json, text)."""
    configure(env.choice("RELAYQ_LOG_LEVEL", "info", LEVELS),
              env.choice("RELAYQ_LOG_FORMAT", "auto", FORMATS))


def configure(level: str = "info", fmt: str = "auto") -> None:
    """fmt: 'json', 'text', or 'auto' (text on a terminal, JSON otherwise)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
