"""The Grafana dashboard and the Prometheus beside it (deploy/, docker-compose.yml): the files
parse, Prometheus scrapes every relayq service compose runs, and every metric the dashboard
queries is one the services really export, read from their own /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import yaml

from relayq.ports import free_port
from tests.databases import create_database, drop_database, dsn_for
from tests.services import ServiceProcess, admin_process, ingest_process, router_process

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "relayq.json"

# What PromQL and Grafana put beside metric names: functions (followed by "("), aggregation
# keywords and the dashboard's variables.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
             "and", "or", "unless", "le", "inf", "nan"}
# What an issue names: each of these must be on the dashboard.
REQUIRED = {
    "ingest rate": "relayq_ingest_events_total",
    "ingest latency": "relayq_ingest_flush_seconds_bucket",
    "deliveries by outcome per destination": "relayq_router_deliveries_total",
    "backlog": "relayq_jobs",
    "oldest pending age": "relayq_jobs_oldest_pending_seconds",
    "circuits": "relayq_router_circuits_open",
    "router partitions": "relayq_router_partitions_owned",
    "leases": "relayq_router_heartbeat_timeouts_total",
    "Postgres pool use": "relayq_db_pool_connections",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every target of every panel, and every templating query."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
        assert inner, f"variable {variable['name']}: {query!r}"
        found.append((f"${variable['name']}", inner.group(1)))
    return found


def test_the_dashboard_parses_and_asks_its_provisioned_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
                             .read_text())["datasources"]
    uids = {s["uid"] for s in sources}
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
            assert metric_names(target["expr"]), (panel["title"], target["expr"])
    read = {name for _, expr in queries(dashboard) for name in metric_names(expr)}
    for topic, metric in REQUIRED.items():
        assert metric in read, f"the dashboard shows no {topic} ({metric})"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/relayq.yml")
                               .read_text())["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = compose["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{providers[0]['options']['path']}:ro" in mounts


def test_prometheus_scrapes_every_relayq_service_compose_runs() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    ports = {"relayq-ingest": 9151, "relayq-router": 9153, "relayq-admin": 9152}
    expected = {f"{name}:{ports[service['command'][0]]}" for name, service in compose.items()
                if service.get("command", [""])[0] in ports}
    assert expected == targets
    mounted = compose["prometheus"]["volumes"][0].split(":")
    assert (ROOT / mounted[0]).resolve() == (DEPLOY / "prometheus/prometheus.yml").resolve()


@pytest.fixture(scope="module")
def exported(template_database: str) -> Iterator[set[str]]:
    """Every sample name the three services' /metrics offer, read from the processes."""
    name = create_database(template_database)
    database = dsn_for(name)
    ports = {"INGEST": free_port(), "ROUTER": free_port(), "ADMIN": free_port()}
    metrics = {f"RELAYQ_{s}_METRICS_ADDRESS": f"127.0.0.1:{p}" for s, p in ports.items()}
    started: list[ServiceProcess] = []
    try:
        started.append(ingest_process(database, **metrics))
        started.append(router_process(database, **metrics))
        started.append(admin_process(database, **metrics))
        names: set[str] = set()
        for port in ports.values():
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                names |= exposition_names(answer.read().decode())
        yield names
    finally:
        for service in started:
            service.terminate()
            service.close()
        drop_database(name)


def exposition_names(text: str) -> set[str]:
    """Sample names a /metrics page can carry: each family's, with the suffixes its type
    gives its samples (families with no sample yet are declared by their TYPE line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            suffixes = {"counter": ("", "_total", "_created"),
                        "histogram": ("_bucket", "_sum", "_count", "_created"),
                        "summary": ("", "_sum", "_count", "_created")}.get(kind, ("",))
            base = family.removesuffix("_total") if kind == "counter" else family
            names |= {base + suffix for suffix in suffixes}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_the_dashboard_queries_is_exported(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    missing = sorted({(where, name) for where, expr in queries(dashboard)
                      for name in metric_names(expr) if name not in exported})
    assert not missing, f"queried but exported by no service: {missing}"
    assert "relayq_db_pool_connections" in exported
