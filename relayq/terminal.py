"""Writing to a terminal or a pipe whose reader may be gone (`relayq stats | head -3`,
`make up | tee log` after tee died).

A write to a pipe nobody reads fails with EPIPE (BrokenPipeError: Python ignores SIGPIPE). A
command that was only printing should then stop quietly, as `head` expects; a long-running one
(`relayq up`) must go on, above all still stop on Ctrl-C or SIGTERM, just without output. In
both cases the stream is pointed at /dev/null, so that Python's own flush at exit does not
fail again with a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TextIO


def write(text: str, out: TextIO | None = None) -> bool:
    """Write and flush `text`; False (and `out` silenced from now on) if its reader is gone."""
    out = sys.stdout if out is None else out
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        silence(out)
        return False
    return True


def silence(out: TextIO) -> None:
    """Send whatever `out` still writes (its buffer included) to /dev/null."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
