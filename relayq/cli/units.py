"""Reading durations as people write them on a command line: 500ms, 30s, 5m, 3h, 1d."""

from __future__ import annotations

import argparse
import re

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")


def milliseconds(text: str) -> int:
    """An argparse type: '1.5s' -> 1500. A bare number means seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 500ms, 30s, 5m or 3h, got {text!r}")
    value = round(float(match.group(1)) * _UNITS_MS[match.group(2) or "s"])
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} is too long")
    return value


def seconds(text: str) -> int:
    """An argparse type: whole seconds ('5m' -> 300); '500ms' rounds up to 1."""
    return -(-milliseconds(text) // 1000)
