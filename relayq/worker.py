"""A service process run as one worker of a supervisor (relayq.supervisor): its side of the link.

The supervisor starts each worker with the service's own environment plus the variables below
(internal: set by the supervisor, never by an operator). A worker is an ordinary service
process but for four things:

- it serves the port its siblings serve (SO_REUSEPORT; relayq.config.ServerConfig.share_port)
  and writes its metrics where the supervisor adds them up (PROMETHEUS_MULTIPROC_DIR) instead
  of serving its own;
- it tells the supervisor through a pipe that it has started, or the one line that says why it
  could not: the supervisor prints that line once, however many workers failed alike;
- a second SIGTERM or SIGINT does not end it at once. A terminal's Ctrl-C, or a service
  manager signalling the whole process group, reaches the workers as well as the supervisor,
  which forwards the signal too: the second copy must not cut the drain short. The
  supervisor ends its workers at once itself (SIGKILL) when it gets a second signal;
- it dies with its supervisor: should the supervisor be killed outright, each worker gets
  SIGTERM (Linux's parent-death signal) and drains on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable, Mapping

# This process's worker number, 1..N; set only in workers.
INDEX = "RELAYQ_WORKER_INDEX"
# The write end of the pipe to the supervisor.
PIPE = "RELAYQ_WORKER_PIPE"
# The supervisor's pid: a worker whose parent is already another process exits at once.
SUPERVISOR = "RELAYQ_WORKER_SUPERVISOR"

READY = "ready"
FAILED = "failed "


def index(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's worker number, or None when it is not a worker."""
    raw = (os.environ if environ is None else environ).get(INDEX, "").strip()
    return int(raw) if raw.isdigit() else None


class Link:
    """The worker's end of its pipe to the supervisor."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.index = index(environ)
        raw = environ.get(PIPE, "")
        self._fd: int | None = int(raw) if self.index is not None and raw.isdigit() else None
        if self._fd is not None:
            os.set_inheritable(self._fd, False)  # not for our own children (py-spy, say)

    @property
    def is_worker(self) -> bool:
        return self.index is not None

    def tie_to_supervisor(self, environ: Mapping[str, str] | None = None) -> None:
        """SIGTERM when the supervisor dies; exit now if it already has (the parent-death
        signal is armed only from here on, and a supervisor killed in between would leave
        this worker running unseen)."""
        environ = os.environ if environ is None else environ
        die_with_parent(signal.SIGTERM)()
        raw = environ.get(SUPERVISOR, "")
        if raw.isdigit() and os.getppid() != int(raw):
            os._exit(1)

    def ready(self) -> None:
        self._send(READY)

    def failed(self, message: str) -> None:
        """The one line saying why this worker stops; the supervisor prints it."""
        self._send(FAILED + " ".join(message.split()))

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
            os.write(self._fd, line.encode(errors="replace") + b"\n")


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A function arranging that this process gets `sig` when its parent dies (Linux; a no-op
    elsewhere). Usable as a subprocess preexec_fn, where it runs after the child switched user,
    since a change of credentials clears the setting."""
    def set_it() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    return set_it
