"""The operator console in a real browser (headless Chromium) against a real relayq: ingest,
router and admin as their own processes, a webhook sink in this process.

Everything is set up as a user would: tenants, sources and destinations through the admin
API, events through ingest, delivered by the router. One browser serves every test (a fresh
profile); each test signs in as it needs. Screenshots of each page go to
RELAYQ_CONSOLE_SCREENSHOTS (docs/console when `make console-screenshots` runs them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import grpc
import pytest

from jobsdb.keyspace import job_id
from relayq.ports import free_port
from relayq.v1 import admin_pb2, admin_pb2_grpc, common_pb2, ingest_pb2, ingest_pb2_grpc
from tests.browser import BackgroundLoop, Browser, require_chromium
from tests.databases import create_database, drop_database, dsn_for
from tests.helpers import auth, event
from tests.poll import wait_until
from tests.services import (
    OPERATOR_TOKEN,
    ServiceProcess,
    admin_process,
    ingest_process,
    router_process,
)
from tests.sinks import OK, Answer, Received, WebhookSink

OPERATOR = auth(OPERATOR_TOKEN)
SLOW_RETRIES = common_pb2.RetryPolicy(min_backoff_ms=600_000, max_backoff_ms=600_000)


@dataclass
class Relayq:
    database: str
    processes: list[ServiceProcess]
    admin: admin_pb2_grpc.AdminStub
    ingest: ingest_pb2_grpc.IngestStub
    console: str
    write_key: str
    beta_write_key: str
    tenant_token: str
    sink: WebhookSink
    # Users whose deliveries the sink refuses (503) while they are here.
    refused: set[str]

    def send(self, message_id: str, user: str, *, key: str = "") -> list[int]:
        answer = self.ingest.Ingest(ingest_pb2.IngestRequest(events=[event(message_id, user)]),
                                    metadata=auth(key or self.write_key), timeout=10)
        # Each source has one connection (slot 1): the event's one job.
        result = answer.results[0]
        return [job_id(result.event_id, 1)] if result.event_id else []

    def state(self, job_id: int) -> int:
        return self.admin.GetJob(admin_pb2.GetJobRequest(job_id=job_id), metadata=OPERATOR,
                                 timeout=10).state


@pytest.fixture(scope="module")
def relayq(template_database: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Relayq]:
    require_chromium()
    name = create_database(template_database)
    database = dsn_for(name)
    loop = BackgroundLoop()
    sink = WebhookSink()
    refused: set[str] = set()

    def answer(delivery: Received) -> Answer:
        return Answer(503, body="receiver down") if delivery.user_id in refused else OK

    sink.answer = answer
    processes: list[ServiceProcess] = []
    channels: list[grpc.Channel] = []
    try:
        loop.run(sink.start())
        console_port = free_port()
        processes += [ingest_process(database), router_process(database),
                      admin_process(database,
                                    RELAYQ_ADMIN_CONSOLE_ADDRESS=f"127.0.0.1:{console_port}")]
        console = f"http://127.0.0.1:{console_port}"
        wait_until(lambda: _answers(console + "/sign-in"), what="the console answering")
        channels = [grpc.insecure_channel(f"127.0.0.1:{p.port}") for p in processes[::2]]
        ingest, admin = ingest_pb2_grpc.IngestStub(channels[0]), \
            admin_pb2_grpc.AdminStub(channels[1])
        keys = _configure(admin, sink.url)
        yield Relayq(database, processes, admin, ingest, console, keys["web"], keys["beta-web"],
                     keys["token"], sink, refused)
    finally:
        for channel in channels:
            channel.close()
        for process in processes:
            process.terminate()
            process.close()
        loop.run(sink.stop())
        loop.close()
        drop_database(name)


def _configure(admin: admin_pb2_grpc.AdminStub, sink_url: str) -> dict[str, str]:
    """Two tenants, as an operator would set them up over the admin API."""
    keys = {}
    for tenant, destinations in (("acme", ("hook", "breaker")), ("beta", ("beta-hook",))):
        admin.CreateTenant(admin_pb2.CreateTenantRequest(id=tenant, name=tenant.title()),
                           metadata=OPERATOR)
        source = f"{tenant}-web" if tenant == "beta" else "web"
        keys[source] = admin.CreateSource(admin_pb2.CreateSourceRequest(
            id=source, tenant_id=tenant), metadata=OPERATOR).write_key
        for destination in destinations:
            admin.CreateDestination(admin_pb2.CreateDestinationRequest(
                id=destination, tenant_id=tenant, type="webhook", endpoint=sink_url,
                retry_policy=SLOW_RETRIES), metadata=OPERATOR)
        # One connection each, so an event is one job (the breaker gets none).
        admin.ConnectSource(admin_pb2.ConnectSourceRequest(
            source_id=source, destination_id=destinations[0]), metadata=OPERATOR)
    keys["token"] = admin.CreateAdminToken(admin_pb2.CreateAdminTokenRequest(
        tenant_id="acme", name="console test"), metadata=OPERATOR).secret
    return keys


def _answers(url: str) -> bool:
    try:
        with urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser(relayq: Relayq, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    shots = Path(os.environ.get("RELAYQ_CONSOLE_SCREENSHOTS", "")
                 or tmp_path_factory.mktemp("screenshots"))
    opened = Browser(tmp_path_factory.mktemp("chromium-profile"), shots)
    opened.base = relayq.console
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def operator(browser: Browser) -> Browser:
    browser.sign_out()
    browser.sign_in(OPERATOR_TOKEN)
    return browser


def _delivered(relayq: Relayq, job_id: int) -> bool:
    return relayq.state(job_id) == common_pb2.JOB_STATE_SUCCEEDED


def test_sign_in_page_refuses_a_wrong_token(browser: Browser) -> None:
    browser.sign_out()
    browser.open("/")
    assert browser.all("#token"), "an unsigned visitor lands on the sign-in page"
    browser.screenshot("sign-in")
    browser.type("#token", "rq_at_not-a-token")
    browser.click("#sign-in")
    assert browser.text("#error") == "unknown or revoked admin token"
    cookie = browser.driver.get_cookie("relayq_signin")
    assert cookie is not None
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"


def test_operator_sees_every_tenant_and_figures_update_live(relayq: Relayq,
                                                            operator: Browser) -> None:
    session = operator.driver.get_cookie("relayq_session")
    assert session is not None
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    operator.open("/")
    rows = {r.get_attribute("data-destination") for r in operator.all("#overview tbody tr")}
    assert rows == {"hook", "breaker", "beta-hook"}
    before = operator.text("tr[data-destination='hook'] td.delivered")
    jobs = [j for i in range(6) for j in relayq.send(f"live-{i}", f"shopper-{i}")]
    wait_until(lambda: all(_delivered(relayq, j) for j in jobs), what="deliveries")
    # No reload: the table refreshes itself.
    operator.wait(lambda: operator.text("tr[data-destination='hook'] td.delivered") != before,
                  what="the delivered rate changing live")
    operator.screenshot("overview")
    operator.type("#search", "beta")
    operator.find("#search").submit()
    operator.wait(lambda: [r.get_attribute("data-destination")
                           for r in operator.all("#overview tbody tr")] == ["beta-hook"])
    operator.open("/?sort=destination&dir=desc")
    assert [r.get_attribute("data-destination")
            for r in operator.all("#overview tbody tr")] == ["hook", "breaker", "beta-hook"]


def test_a_bad_filter_shows_its_error_at_its_position(operator: Browser) -> None:
    operator.open("/jobs")
    operator.type("#filter", "destination = 'hook' AND state = 'lost'")
    operator.click("#find")
    error = operator.wait(lambda: operator.all("#filter-error"), what="the filter's error")[0]
    assert error.get_attribute("data-column") == "34"
    assert operator.text("#filter-error mark") == "'"
    assert "column 34: expected a job state" in error.text
    # The caret sits under the column it names.
    caret_line = error.find_element("css selector", "pre").text.splitlines()[1]
    assert caret_line.index("^") == 33
    operator.screenshot("jobs-bad-filter")


def test_a_stuck_users_blocking_job_is_found_retried_with_a_reason_and_delivered(
        relayq: Relayq, operator: Browser) -> None:
    relayq.refused.add("alice")
    [first] = relayq.send("alice-1", "alice")
    wait_until(lambda: relayq.state(first) == common_pb2.JOB_STATE_FAILED,
               what="alice's first job failing")
    held = relayq.send("alice-2", "alice") + relayq.send("alice-3", "alice")
    wait_until(lambda: all(relayq.state(j) == common_pb2.JOB_STATE_WAITING for j in held),
               what="alice's later jobs waiting behind it")

    operator.open("/jobs")
    operator.type("#filter", "destination = 'hook' AND user_id = 'alice' AND state = 'waiting'")
    operator.click("#find")
    operator.wait(lambda: len(operator.all("#jobs tbody tr[data-job]")) == 2)
    operator.screenshot("jobs")
    operator.click("#jobs tbody tr[data-job] a.blocker")
    operator.wait(lambda: operator.all("#state"))
    assert operator.text("h1") == f"Job {first}"
    assert operator.text("#state") == "failed"
    assert "503" in operator.text("#attempts")

    # Peek shows the same: alice held back, her blocking job one click away.
    operator.open("/destinations/hook/peek")
    assert operator.text("#stuck tr[data-user='alice'] a.blocker") == f"job {first}"
    operator.screenshot("peek")
    operator.click("#stuck tr[data-user='alice'] a.blocker")
    operator.wait(lambda: operator.text("h1") == f"Job {first}")

    relayq.refused.discard("alice")  # the receiver is fixed
    operator.click("#retry")
    operator.wait(lambda: operator.all("#matched"))
    assert operator.text("#matched") == "1"
    assert relayq.state(first) == common_pb2.JOB_STATE_FAILED, "a dry run changes nothing"
    operator.screenshot("retry-dry-run")
    operator.type("#reason", "receiver fixed")
    operator.click("#apply")
    operator.wait(lambda: operator.text("#state") == "succeeded", within=30,
                  what="the job delivered, shown live")
    assert "retry: 1 of 1 matched jobs changed" in operator.text("#done")
    assert "receiver fixed" in operator.text("#attempts")
    assert "admin:operator" in operator.text("#attempts")
    operator.screenshot("job")
    wait_until(lambda: all(_delivered(relayq, j) for j in held), what="alice's later jobs")


def test_retry_needs_a_reason(relayq: Relayq, operator: Browser) -> None:
    operator.open("/jobs/retry?filter=" + "destination%20%3D%20%27hook%27")
    csrf = operator.find("input[name=csrf]").get_attribute("value") or ""
    # The form says so in the browser; a form posted without one is refused by the server.
    assert operator.find("#reason").get_attribute("required") is not None
    assert operator.post("/jobs/retry", {"csrf": csrf, "filter": "destination = 'hook'",
                                         "reason": " "}) == 400


def test_a_circuit_shows_open_then_closed(operator: Browser) -> None:
    operator.open("/destinations/breaker")
    assert operator.text("#circuit") == "closed"
    operator.type("#circuit-reason", "receiver migrating")
    operator.click("#open-circuit")
    operator.wait(lambda: operator.text("#circuit") == "open", what="the circuit open")
    assert "receiver migrating" in operator.text("#destination-live")
    operator.screenshot("destination")
    operator.click("#close-circuit")
    operator.wait(lambda: operator.text("#circuit") == "closed", what="the circuit closed")
    operator.click("#pause")
    operator.wait(lambda: operator.text("#paused") == "yes")
    operator.click("#resume")
    operator.wait(lambda: operator.text("#paused") == "no")


def test_a_tenant_sees_and_acts_on_its_own_tenant_only(relayq: Relayq, browser: Browser
                                                       ) -> None:
    [beta_job] = relayq.send("beta-1", "carol", key=relayq.beta_write_key)
    browser.sign_out()
    browser.sign_in(relayq.tenant_token)
    assert browser.text("#who") == "tenant acme"
    assert {r.get_attribute("data-destination")
            for r in browser.all("#overview tbody tr")} == {"hook", "breaker"}
    browser.screenshot("overview-tenant")
    # URLs typed by hand: another tenant's destination, its peek, its job.
    for path in ("/destinations/beta-hook", "/destinations/beta-hook/peek",
                 f"/jobs/{beta_job}"):
        browser.open(path)
        assert "not found" in browser.text("#error"), path
    browser.open("/jobs?filter=" + "destination%20%3D%20%27beta-hook%27")
    assert browser.text("#jobs tbody") == "No job matches."
    # Forms replayed with this session's own valid CSRF token, against beta's objects.
    browser.open("/destinations/hook")
    csrf = browser.find("input[name=csrf]").get_attribute("value") or ""
    for path, fields in (("/destinations/beta-hook/pause", {}),
                         ("/destinations/beta-hook/open-circuit", {"reason": "x"}),
                         ("/connections/disconnect", {"source_id": "beta-web",
                                                      "destination_id": "beta-hook"})):
        assert browser.post(path, {"csrf": csrf, **fields}) == 404, path
    # Jobs by id answer as AbortJobs does: another tenant's job matches nothing.
    browser.post("/jobs/abort", {"csrf": csrf, "job_id": str(beta_job), "reason": "x"})
    browser.open(f"/jobs/abort?job_id={beta_job}")
    assert browser.text("#matched") == "0"
    beta = relayq.admin.GetDestination(admin_pb2.GetDestinationRequest(id="beta-hook"),
                                       metadata=OPERATOR)
    assert not beta.paused
    assert not beta.circuit.open
    assert relayq.state(beta_job) != common_pb2.JOB_STATE_ABORTED
    # Operator-only: the console says so rather than doing it.
    browser.open("/tenants")
    assert not browser.all("form[action='/tenants']")
    assert browser.post("/tenants", {"csrf": csrf, "id": "evil"}) == 403


def test_sign_out_and_a_revoked_token_end_sessions(relayq: Relayq, browser: Browser) -> None:
    token = relayq.admin.CreateAdminToken(admin_pb2.CreateAdminTokenRequest(
        tenant_id="acme", name="revoked soon"), metadata=OPERATOR)
    browser.sign_out()
    browser.sign_in(token.secret)
    relayq.admin.RevokeAdminToken(admin_pb2.RevokeAdminTokenRequest(id=token.token.id),
                                  metadata=OPERATOR)
    browser.open("/destinations")
    assert browser.all("#token"), "a revoked token's session ends"
    browser.sign_in(OPERATOR_TOKEN)
    browser.click("#sign-out")
    browser.open("/")
    assert browser.all("#token"), "signed out"


def test_catalog_pages_show_secrets_once_and_connections_with_filters(
        relayq: Relayq, operator: Browser) -> None:
    operator.open("/sources")
    operator.type("form[action='/sources'] input[name=id]", "mobile")
    operator.type("form[action='/sources'] input[name=tenant_id]", "acme")
    operator.find("form[action='/sources']").submit()
    assert operator.wait(lambda: operator.text("#secret")).startswith("rq_wk_")
    operator.screenshot("source-write-key")
    operator.open("/destinations")
    operator.type("form[action='/destinations'] input[name=id]", "crm")
    operator.type("form[action='/destinations'] input[name=tenant_id]", "acme")
    operator.type("form[action='/destinations'] input[name=endpoint]", relayq.sink.url)
    operator.find("form[action='/destinations']").submit()
    assert operator.wait(lambda: operator.text("#secret")).startswith("whsec_")
    operator.screenshot("destination-secret")
    operator.open("/destinations")
    operator.screenshot("destinations")
    operator.open("/connections")
    operator.type("form[action='/connections/connect'] input[name=source_id]", "mobile")
    operator.type("form[action='/connections/connect'] input[name=destination_id]", "crm")
    operator.type("form[action='/connections/connect'] input[name=filter]", "event = 'Signup'")
    operator.find("form[action='/connections/connect']").submit()
    operator.wait(lambda: "event = 'Signup'" in operator.driver.page_source)
    # A malformed filter is refused with its column, and the page keeps what was typed.
    operator.type("form[action='/connections/connect'] input[name=source_id]", "web")
    operator.type("form[action='/connections/connect'] input[name=destination_id]", "crm")
    operator.type("form[action='/connections/connect'] input[name=filter]", "event = ")
    operator.find("form[action='/connections/connect']").submit()
    assert "filter: column 8" in operator.wait(lambda: operator.text("#error"))
    operator.open("/connections")
    operator.screenshot("connections")
    operator.open("/sources")
    operator.screenshot("sources")
    operator.open("/tenants")
    operator.screenshot("tenants")
    connections = relayq.admin.ListConnections(admin_pb2.ListConnectionsRequest(
        destination_id="crm"), metadata=OPERATOR).connections
    assert [(c.source_id, c.filter) for c in connections] == [("mobile", "event = 'Signup'")]


def test_relayq_up_prints_the_console_url_and_it_works(
        template_database: str, browser: Browser, tmp_path: Path) -> None:
    name = create_database(template_database)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYQ_", "PG"))}
    out = tmp_path / "up.out"
    with out.open("wb") as stdout:
        up = subprocess.Popen(
            [sys.executable, "-c", "from relayq.cli import main; main()", "up", "--free-ports",
             "--events-per-second", "20", "--grace", "5"],
            cwd=tmp_path, env={**environ, "RELAYQ_DATABASE_URL": dsn_for(name)},
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT)
    base = browser.base
    try:
        info_path = tmp_path / ".relayq" / "cluster.json"
        wait_until(lambda: info_path.exists() and "console http" in out.read_text(),
                   within=90, what=lambda: f"relayq up printing its console\n{out.read_text()}")
        info: dict[str, Any] = json.loads(info_path.read_text())
        line = next(x for x in out.read_text().splitlines() if x.strip().startswith("console"))
        url = line.split()[1]
        assert url == info["console"]
        browser.sign_out()
        browser.base = url.rstrip("/")
        browser.sign_in(info["admin_token"])
        browser.wait(lambda: {r.get_attribute("data-destination")
                              for r in browser.all("#overview tbody tr")}
                     >= {"demo-healthy", "demo-flaky"}, what="the demo's destinations")
        browser.wait(lambda: browser.text("tr[data-destination='demo-healthy'] td.delivered")
                     != "0", within=30, what="demo traffic delivered")
        browser.screenshot("up-overview")
        browser.sign_out()
    finally:
        browser.base = base
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        drop_database(name)
