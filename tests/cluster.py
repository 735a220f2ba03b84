"""Service processes with their metrics ports (and TLS) on, for the operations tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.request import urlopen

import grpc
from prometheus_client.parser import text_string_to_metric_families

from relayq.ports import free_port
from tests.poll import wait_until
from tests.services import ServiceProcess, quiet_env

MODULES = {"ingest": "ingest_service.main", "router": "router_service.main",
           "admin": "admin_service.main"}


@dataclass
class Service:
    name: str
    process: ServiceProcess
    metrics_port: int | None

    @property
    def port(self) -> int:
        return self.process.port

    def log(self) -> str:
        """Everything the process wrote to stderr so far (JSON lines)."""
        self.process._log.seek(0)
        return self.process._log.read().decode(errors="replace")

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample on /metrics, keyed by (name, labels)."""
        assert self.metrics_port is not None
        with urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    """The value of one series; 0 when it is absent (a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_ready_tls(service: ServiceProcess, root_certificate: bytes, within: float = 30.0
                   ) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificate)

    def ready() -> bool:
        if service.process.poll() is not None:
            raise RuntimeError(f"service exited early: {service.stderr()}")
        with grpc.secure_channel(f"127.0.0.1:{service.port}", credentials) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return True
            except grpc.FutureTimeoutError:
                return False

    wait_until(ready, within=within, every=0,
               what=lambda: f"service on port {service.port} ready: {service.stderr()}")


@contextmanager
def service(name: str, database_url: str, *, metrics: bool = True,
            tls_root: bytes | None = None, **extra: str) -> Iterator[Service]:
    """One relayq service as its own process on free ports; SIGTERM (drain) at the end."""
    port = free_port()
    metrics_port = free_port() if metrics else None
    prefix = f"RELAYQ_{name.upper()}"
    env = quiet_env(database_url, **{
        f"{prefix}_ADDRESS": f"127.0.0.1:{port}",
        f"{prefix}_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}" if metrics_port else "off",
        **extra})
    process = ServiceProcess(MODULES[name], env, port)
    try:
        if tls_root is None:
            process.wait_ready()
        else:
            wait_ready_tls(process, tls_root)
        yield Service(name, process, metrics_port)
        if process.process.poll() is None:
            process.terminate()
    finally:
        process.close()
