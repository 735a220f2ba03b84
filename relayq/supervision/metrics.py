"""The workers' metrics added up (prometheus_client's multiprocess mode): a directory made
fresh for each start, where every worker writes its own; one /metrics for the service,
served by the supervisor with its own two counts beside them."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relayq import addresses
from relayq.config import ServerConfig
from relayq.supervision.children import WorkerProcess

# Variables that would point a worker's metrics anywhere but this start's own directory.
MULTIPROC = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def make_directory(name: str) -> str:
    """A fresh directory for this start's workers to count in (after removing those of this
    service's supervisors that are gone)."""
    _remove_orphans(name)
    return tempfile.mkdtemp(prefix=f"{name}-metrics-{os.getpid()}-")


def _remove_orphans(name: str) -> None:
    """Remove the metrics directories of this service's supervisors that are gone: one killed
    outright (SIGKILL, the OOM killer) had no chance to. The pid is in the name."""
    for path in Path(tempfile.gettempdir()).glob(f"{name}-metrics-*-*"):
        pid = path.name[len(name) + len("-metrics-"):].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


class Counts:
    """What the supervisor itself reports, beside its workers' metrics (read by the metrics
    server's thread)."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []
        self.restarts = 0

    def collect(self) -> Iterator[Metric]:
        serving = sum(1 for w in self.workers if w.running and w.ready.is_set())
        yield GaugeMetricFamily("relayq_workers", "Worker processes started and serving (of"
                                " RELAYQ_<SERVICE>_WORKERS).", value=serving)
        yield CounterMetricFamily("relayq_worker_restarts", "Workers restarted after they"
                                  " died.", value=self.restarts)


counts = Counts()


def serve(server: ServerConfig, directory: str) -> Callable[[], None]:
    """Serve the workers' metrics and the supervisor's counts; the function that stops it."""
    assert server.metrics_address is not None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(counts)
    host, port = addresses.split(server.metrics_address)
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise addresses.AddressUnusable(server.metrics_variable, server.metrics_address,
                                        addresses.reason(exc)) from None

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
    return stop


def mark_dead(pid: int, directory: str) -> None:
    """A dead worker's live gauges leave the sum; its counts stay."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
