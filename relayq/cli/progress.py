"""A one-line progress display for long commands, on a terminal only.

Redrawn in place (carriage return) a few times a second from its own thread, so it moves
while the command waits (for a full buffer, for the last answers); on a pipe or a file it
writes nothing at all, and the command's summary is the only output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TextIO


class ProgressLine:
    def __init__(self, render: Callable[[], str], out: TextIO, interval: float = 0.25) -> None:
        self._render = render
        self._out = out
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def __enter__(self) -> ProgressLine:
        if self._out.isatty():
            self._thread = threading.Thread(target=self._run, name="relayq-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._draw()  # the final figures stay on screen
        self._out.write("\n")
        self._out.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw()

    def _draw(self) -> None:
        text = self._render()
        # Pad over what a longer previous line left behind.
        self._out.write("\r" + text.ljust(self._width))
        self._out.flush()
        self._width = len(text)
