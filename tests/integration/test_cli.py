"""The `relayq` admin CLI against a real relayq-admin on a real Postgres.

Each command runs as `relayq.cli.main([...])` in a worker thread (the CLI is a blocking gRPC
client; the in-process admin server needs the test's event loop free to answer), and the
checks read what a person or a script would read: the table, or the one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import AsyncConnection

from jobsdb import keyspace
from relayq import cli
from relayq.cli import render, units
from relayq.cli.destinations import parse_header
from relayq.ports import free_port
from relayq.v1 import ingest_pb2
from tests import factories
from tests.helpers import auth, event
from tests.pipeline import World, send
from tests.poll import eventually
from tests.services import OPERATOR_TOKEN as OPERATOR
from tests.services import admin, ingest, router
from tests.sinks import OK, Answer


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """What the CLI said on stderr (the in-process server's own log lines share it)."""
        start = self.err.find("relayq: ")
        return self.err[start:] if start >= 0 else self.err

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)

    def rows(self) -> list[list[str]]:
        """The table's body as cells (columns are split on runs of two spaces)."""
        assert self.code == 0, self.err
        lines = self.out.splitlines()
        return [_cells(line) for line in lines[1:]]

    def header(self) -> list[str]:
        return _cells(self.out.splitlines()[0])


def _cells(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


class Relayq:
    """Runs the CLI against one admin server, as the operator unless told otherwise."""

    def __init__(self, port: int, capsys: pytest.CaptureFixture[str]) -> None:
        self.port = port
        self.capsys = capsys

    async def __call__(self, *argv: str, token: str | None = OPERATOR) -> Result:
        full = [*argv, "--admin", f"127.0.0.1:{self.port}"]
        if token is not None:
            full += ["--token", token]
        self.capsys.readouterr()
        code = await asyncio.to_thread(_exit_status, full)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)


def _exit_status(argv: list[str]) -> int:
    try:
        cli.main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    raise AssertionError("relayq.cli.main returned without exiting")


@pytest.fixture
async def relayq(database: str, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Relayq]:
    # Nothing from the developer's shell may leak into what is tested.
    for name in ("RELAYQ_ADMIN_ADDRESS", "RELAYQ_ADMIN_TOKEN", "RELAYQ_ADMIN_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    async with admin(database) as service:
        yield Relayq(service.app.port, capsys)


def fields(out: str) -> dict[str, str]:
    """A `name  value` block (render.fields) as a dict; stops at the first blank line."""
    found: dict[str, str] = {}
    for line in out.splitlines():
        if not line.strip():
            break
        name, _, value = line.partition("  ")
        found[name.strip()] = value.strip()
    return found


# ---------- configuration ----------

async def test_tenants_create_list_get(relayq: Relayq) -> None:
    made = await relayq("tenants", "create", "acme", "--name", "Acme Inc")
    assert made.code == 0, made.err
    assert fields(made.out)["id"] == "acme"
    assert fields(made.out)["name"] == "Acme Inc"
    assert "UTC" in fields(made.out)["created"]
    await relayq("tenants", "create", "globex")

    listed = await relayq("tenants", "list")
    assert listed.header() == ["ID", "NAME", "CREATED"]
    assert sorted(row[:2] for row in listed.rows()) == [["acme", "Acme Inc"], ["globex", "-"]]

    doc = (await relayq("tenants", "get", "acme", "--json")).json()
    assert doc["id"] == "acme"
    assert doc["name"] == "Acme Inc"
    datetime.fromisoformat(doc["createdAt"])  # the JSON mapping's RFC 3339 time

    docs = (await relayq("tenants", "list", "--json")).json()
    assert sorted(t["id"] for t in docs["tenants"]) == ["acme", "globex"]


async def test_sources_show_the_write_key_once_and_rotate_it(relayq: Relayq) -> None:
    await relayq("tenants", "create", "acme")
    made = await relayq("sources", "create", "--tenant", "acme", "--id", "web",
                        "--name", "Website")
    assert made.code == 0, made.err
    shown = fields(made.out)
    assert (shown["id"], shown["tenant"], shown["name"], shown["enabled"]) == (
        "web", "acme", "Website", "yes")
    assert shown["write key"]
    assert "shown only now" in made.err

    rotated = (await relayq("sources", "rotate-key", "web", "--grace", "10m", "--json")).json()
    assert rotated["source"]["id"] == "web"
    assert rotated["writeKey"] not in ("", shown["write key"])

    got = await relayq("sources", "get", "web")
    assert fields(got.out)["id"] == "web"
    assert "write key" not in got.out

    listed = await relayq("sources", "list", "--tenant", "acme")
    assert listed.header() == ["ID", "TENANT", "NAME", "ENABLED", "RATE LIMIT", "CREATED"]
    assert [row[:5] for row in listed.rows()] == [["web", "acme", "Website", "yes",
                                                   "unlimited"]]

    updated = await relayq("sources", "update", "web", "--disable", "--rate", "200",
                           "--burst", "400")
    assert updated.code == 0, updated.err
    shown = fields(updated.out)
    assert (shown["enabled"], shown["rate limit"], shown["name"]) == (
        "no", "200/s (burst 400)", "Website")
    again = (await relayq("sources", "update", "web", "--enable", "--name", "Site",
                          "--burst", "50", "--json")).json()
    assert (again["enabled"], again["name"], again["rateLimit"]) == (
        True, "Site", {"perSecond": 200.0, "burst": 50})  # --burst alone kept the rate
    both = await relayq("sources", "update", "web", "--enable", "--disable")
    assert both.code == 2
    assert "not allowed with argument" in both.err


async def test_destinations_create_update_pause_resume(relayq: Relayq) -> None:
    await relayq("tenants", "create", "acme")
    doc = (await relayq(
        "destinations", "create", "--tenant", "acme", "--id", "hook", "--type", "webhook",
        "--endpoint", "http://127.0.0.1:9/hook", "--name", "Warehouse",
        "--min-backoff", "500ms", "--max-backoff", "2m", "--max-attempts", "5",
        "--retry-window", "1h", "--rate", "50", "--burst", "10", "--concurrency", "8",
        "--timeout", "5s", "--header", "Authorization: Bearer s3cr:et", "--json")).json()
    assert doc["id"] == "hook"
    assert doc["type"] == "webhook"
    assert doc["retryPolicy"] == {"minBackoffMs": 500, "maxBackoffMs": 120_000,
                                  "maxAttempts": 5, "maxRetryWindowSeconds": 3600}
    assert doc["rateLimit"] == {"perSecond": 50.0, "burst": 10}
    assert (doc["concurrency"], doc["timeoutMs"], doc["paused"]) == (8, 5000, False)
    assert doc["headers"] == {"Authorization": "Bearer s3cr:et"}

    # People see header names, not the destination's credentials.
    shown = await relayq("destinations", "get", "hook")
    view = fields(shown.out)
    assert view["backoff"] == "500ms to 2m"
    assert view["gives up after"] == "5 attempts and 1h"
    assert view["rate limit"] == "50/s (burst 10)"
    assert view["timeout"] == "5s"
    assert view["headers"] == "Authorization: (14 chars)"
    assert "s3cr" not in shown.out

    # One retry setting changes; the rest of the policy stays as it was.
    updated = (await relayq("destinations", "update", "hook", "--max-attempts", "7",
                            "--endpoint", "http://127.0.0.1:9/v2", "--json")).json()
    assert updated["retryPolicy"] == {**doc["retryPolicy"], "maxAttempts": 7}
    assert updated["endpoint"] == "http://127.0.0.1:9/v2"
    assert updated["rateLimit"] == doc["rateLimit"]
    assert updated["name"] == "Warehouse"

    assert (await relayq("destinations", "pause", "hook", "--json")).json()["paused"] is True
    assert fields((await relayq("destinations", "get", "hook")).out)["paused"] == "yes"
    assert (await relayq("destinations", "resume", "hook", "--json")).json()["paused"] is False

    listed = await relayq("destinations", "list")
    assert listed.header() == ["ID", "TENANT", "NAME", "TYPE", "ENDPOINT", "PAUSED",
                               "CIRCUIT", "CONCURRENCY", "RATE", "CREATED"]
    assert [row[:9] for row in listed.rows()] == [[
        "hook", "acme", "Warehouse", "webhook", "http://127.0.0.1:9/v2", "no", "closed", "8",
        "50/s (burst 10)"]]

    refused = await relayq("destinations", "circuit", "hook", "open")
    assert refused.code != 0
    assert "reason: required" in refused.err
    opened = await relayq("destinations", "circuit", "hook", "open", "--reason", "down")
    assert fields(opened.out)["circuit"].startswith("open since ")
    assert fields(opened.out)["circuit"].endswith(": down (admin:operator)")
    await relayq("destinations", "update", "hook", "--circuit-after", "0")
    assert fields((await relayq("destinations", "get", "hook")).out)["circuit policy"] == \
        "never opens by itself"
    closed = await relayq("destinations", "circuit", "hook", "close", "--json")
    assert closed.json()["circuit"] == {"open": False, "reason": ""}


async def test_a_webhook_signing_secret_is_shown_once_and_rotates(relayq: Relayq) -> None:
    await relayq("tenants", "create", "acme")
    made = await relayq("destinations", "create", "--tenant", "acme", "--id", "hook",
                        "--type", "webhook", "--endpoint", "http://127.0.0.1:9/hook")
    assert made.code == 0, made.err
    first = fields(made.out)["signing secret"]
    assert first.startswith("whsec_")
    assert "shown only now" in made.err
    assert first not in (await relayq("destinations", "get", "hook")).out
    assert first not in (await relayq("destinations", "list", "--json")).out

    rotated = await relayq("destinations", "rotate-secret", "hook", "--grace", "2h")
    assert rotated.code == 0, rotated.err
    shown = fields(rotated.out)
    assert shown["signing secret"].startswith("whsec_")
    assert shown["signing secret"] != first
    assert "in 1h59m" in shown["old secret signs until"] or "in 2h" in shown[
        "old secret signs until"]
    doc = (await relayq("destinations", "rotate-secret", "hook", "--json")).json()
    assert doc["signingSecret"] not in ("", shown["signing secret"])
    assert doc["destination"]["id"] == "hook"
    datetime.fromisoformat(doc["previousExpireAt"])

    await relayq("destinations", "create", "--tenant", "acme", "--id", "sink", "--type", "grpc",
                 "--endpoint", "127.0.0.1:9")
    refused = await relayq("destinations", "rotate-secret", "sink")
    assert refused.code == 1
    assert "FAILED_PRECONDITION" in refused.error
    assert "only webhook destinations sign" in refused.error


async def test_connections_and_tenant_tokens(relayq: Relayq) -> None:
    for tenant, source, destination in (("acme", "web", "hook"), ("globex", "app", "sink")):
        await relayq("tenants", "create", tenant)
        await relayq("sources", "create", "--tenant", tenant, "--id", source)
        await relayq("destinations", "create", "--tenant", tenant, "--id", destination,
                     "--type", "webhook", "--endpoint", "http://127.0.0.1:9/")
        linked = await relayq("connections", "connect", source, destination)
        assert linked.out == f"{source} -> {destination}: connected\n", linked.err

    listed = await relayq("connections", "list")
    assert listed.header() == ["SOURCE", "DESTINATION", "ENABLED", "CREATED", "FILTER"]
    assert sorted(row[:3] + row[-1:] for row in listed.rows()) == [
        ["app", "sink", "yes", "every event"], ["web", "hook", "yes", "every event"]]
    only = (await relayq("connections", "list", "--source", "web", "--json")).json()
    assert [(c["sourceId"], c["destinationId"]) for c in only["connections"]] == [
        ("web", "hook")]

    made = await relayq("tokens", "create", "--tenant", "acme", "--name", "ci")
    secret = fields(made.out)["secret"]
    assert fields(made.out)["tenant"] == "acme"
    assert "shown only now" in made.err

    # The tenant's token sees its tenant only; the other is not there for it.
    mine = await relayq("tenants", "list", "--json", token=secret)
    assert [t["id"] for t in mine.json()["tenants"]] == ["acme"]
    theirs = await relayq("sources", "get", "app", token=secret)
    assert theirs.code == 1
    assert theirs.error.startswith(("relayq: NOT_FOUND: ", "relayq: PERMISSION_DENIED: "))
    # Minting tokens is the operator's alone.
    denied = await relayq("tokens", "create", "--tenant", "acme", token=secret)
    assert denied.code == 1
    assert denied.error.startswith("relayq: PERMISSION_DENIED: ")

    tokens = await relayq("tokens", "list")
    assert tokens.header() == ["ID", "TENANT", "NAME", "CREATED", "REVOKED"]
    assert [row[1:3] + row[-1:] for row in tokens.rows()] == [["acme", "ci", "-"]]
    revoked = await relayq("tokens", "revoke", fields(made.out)["id"])
    assert re.search(r" UTC \((now|\d+s ago)\)$", fields(revoked.out)["revoked"]), revoked.out
    refused = await relayq("tenants", "list", token=secret)
    assert refused.error.startswith("relayq: UNAUTHENTICATED: "), refused.err
    listed = (await relayq("tokens", "list", "--json")).json()
    assert [t["revokedAt"] != "" for t in listed["tokens"]] == [True]

    gone = await relayq("connections", "disconnect", "web", "hook")
    assert gone.out == "web -> hook: disconnected\n", gone.err
    after = (await relayq("connections", "list", "--source", "web", "--json")).json()
    assert all(not c.get("enabled") for c in after["connections"])


async def test_connection_filters(relayq: Relayq) -> None:
    await relayq("tenants", "create", "acme")
    await relayq("sources", "create", "--tenant", "acme", "--id", "web")
    for destination in ("orders", "all"):
        await relayq("destinations", "create", "--tenant", "acme", "--id", destination,
                     "--type", "webhook", "--endpoint", "http://127.0.0.1:9/")
    linked = await relayq("connections", "connect", "web", "orders",
                          "--filter", "event = 'Order Completed'")
    assert linked.out == "web -> orders: connected, filter: event = 'Order Completed'\n"
    await relayq("connections", "connect", "web", "all")

    bad = await relayq("connections", "update", "web", "orders", "--filter", "event = 'x' AND")
    assert bad.code == 1
    assert bad.error == ("relayq: INVALID_ARGUMENT: filter: column 16: expected a field, NOT or"
                         " '(', found end of filter\n")
    updated = await relayq("connections", "update", "web", "orders",
                           "--filter", "properties.revenue >= 100")
    assert updated.out == "web -> orders: connected, filter: properties.revenue >= 100\n"

    listed = await relayq("connections", "list")
    assert [row[:2] + row[-1:] for row in listed.rows()] == [
        ["web", "all", "every event"], ["web", "orders", "properties.revenue >= 100"]]
    stats = (await relayq("stats")).out.split("\n\n")
    assert stats[-1].splitlines() == [
        "SOURCE  DESTINATION  FILTERED OUT  FILTERED/S  FILTER",
        "web     orders       0             0.0         properties.revenue >= 100"]
    cleared = await relayq("connections", "update", "web", "orders", "--filter", "", "--json")
    assert cleared.json()["filter"] == ""


# ---------- jobs ----------

async def _paused_pipeline(relayq: Relayq, database: str, count: int) -> list[int]:
    """acme/web -> a paused webhook 'hook', and `count` events ingested: pending jobs that
    stay put (no router runs, and the destination is paused for peek)."""
    await relayq("tenants", "create", "acme")
    key = (await relayq("sources", "create", "--tenant", "acme", "--id", "web",
                        "--json")).json()["writeKey"]
    await relayq("destinations", "create", "--tenant", "acme", "--id", "hook",
                 "--type", "webhook", "--endpoint", "http://127.0.0.1:9/", "--paused")
    await relayq("connections", "connect", "web", "hook")
    async with ingest(database) as service:
        answer = await service.stub.Ingest(
            ingest_pb2.IngestRequest(events=[event(f"m{i}", f"user{i % 2}", n=i)
                                             for i in range(count)]),
            metadata=auth(key), timeout=10)
    assert [r.destinations for r in answer.results] == [1] * count
    # Ingest answers each event's id; its job at hook is that event at hook's connection.
    async with await AsyncConnection.connect(database) as conn:
        cur = await conn.execute("SELECT slot FROM connections")
        [(slot,)] = await cur.fetchall()
    return [keyspace.job_id(result.event_id, slot) for result in answer.results]


async def test_jobs_list_pages_and_payloads(relayq: Relayq, database: str) -> None:
    ids = await _paused_pipeline(relayq, database, 5)
    assert len(ids) == 5

    listed = await relayq("jobs", "list", "--filter", "destination = 'hook'")
    assert listed.header() == ["JOB", "STATE", "ATTEMPTS", "TENANT", "DESTINATION", "USER",
                               "MESSAGE", "ERROR", "CREATED", "NEXT"]
    assert [row[:8] for row in listed.rows()] == [
        [str(job), "pending", "0", "acme", "hook", f"user{i % 2}", f"m{i}", "-"]
        for i, job in enumerate(ids)]

    page = await relayq("jobs", "list", "--page-size", "2")
    assert [row[0] for row in page.rows()] == [str(j) for j in ids[:2]]
    assert "--page-token" in page.err
    token = page.err.split("--page-token ")[1].split()[0]
    rest = await relayq("jobs", "list", "--page-size", "2", "--page-token", token, "--json")
    assert [int(j["jobId"]) for j in rest.json()["jobs"]] == ids[2:4]

    everything = (await relayq("jobs", "list", "--page-size", "2", "--all", "--json")).json()
    assert [int(j["jobId"]) for j in everything["jobs"]] == ids
    assert everything["nextPageToken"] == ""
    assert all("payload" not in j for j in everything["jobs"])

    with_payload = (await relayq("jobs", "list", "--filter", "payload.properties.n = 3",
                                 "--payload", "--json")).json()
    assert [int(j["jobId"]) for j in with_payload["jobs"]] == [ids[3]]
    assert with_payload["jobs"][0]["payload"]["properties"] == {"n": 3}
    table = await relayq("jobs", "list", "--filter", "job_id = " + str(ids[3]), "--payload")
    assert table.header()[-1] == "PAYLOAD"
    assert '"event":"Order Completed"' in table.rows()[0][-1]

    nothing = await relayq("jobs", "list", "--filter", "state = 'failed'")
    assert (nothing.code, nothing.out, nothing.err) == (0, "", "no jobs match\n")


async def test_events_list_and_get(relayq: Relayq, database: str) -> None:
    jobs = await _paused_pipeline(relayq, database, 4)
    events = [keyspace.event_of(j) for j in jobs]

    listed = await relayq("events", "list", "web", "--filter", "user_id = 'user1'")
    assert listed.header() == ["EVENT", "USER", "MESSAGE", "CREATED", "DESTINATIONS"]
    assert [row[:3] for row in listed.rows()] == [
        [str(events[1]), "user1", "m1"], [str(events[3]), "user1", "m3"]]
    page = await relayq("events", "list", "web", "--limit", "3", "--json")
    assert [int(e["eventId"]) for e in page.json()["events"]] == events[:3]
    everything = await relayq("events", "list", "web", "--limit", "3", "--all", "--json")
    assert [int(e["eventId"]) for e in everything.json()["events"]] == events

    got = await relayq("events", "get", "--source", "web", "--message-id", "m2")
    assert fields(got.out)["event"] == str(events[2])
    table = got.out.split("destinations:\n", 1)[1].splitlines()
    assert re.split(r" {2,}", table[1].strip())[:3] == ["hook", "pending", str(jobs[2])]
    as_json = (await relayq("events", "get", str(events[2]), "--json")).json()
    assert as_json["destinations"][0]["status"] == "EVENT_STATUS_PENDING"
    assert as_json["event"]["messageId"] == "m2"

    both = await relayq("events", "get", str(events[2]), "--message-id", "m2")
    assert both.code == 2
    assert "one of them" in both.err
    bad = await relayq("events", "list", "web", "--filter", "state = 'failed'")
    assert bad.code == 1
    assert "INVALID_ARGUMENT" in bad.error
    assert "column 1" in bad.error
    missing = await relayq("events", "get", "--source", "web", "--message-id", "nope")
    assert missing.code == 1
    assert "NOT_FOUND" in missing.error


async def test_jobs_get_peek_abort_retry(relayq: Relayq, database: str) -> None:
    ids = await _paused_pipeline(relayq, database, 4)

    shown = await relayq("jobs", "get", str(ids[1]))
    view = fields(shown.out)
    assert (view["job"], view["state"], view["destination"], view["user"]) == (
        str(ids[1]), "pending", "hook", "user1")
    assert "payload:" in shown.out
    assert '"n": 1' in shown.out
    doc = (await relayq("jobs", "get", str(ids[1]), "--json")).json()
    assert doc["state"] == "JOB_STATE_PENDING"
    assert doc["payload"]["messageId"] == "m1" or doc["payload"]["properties"] == {"n": 1}

    # The destination is paused: peek shows the delivery order and that nothing may go.
    peeked = await relayq("jobs", "peek", "hook")
    assert peeked.header() == ["#", "JOB", "STATE", "ATTEMPTS", "USER", "RUNNABLE", "WHY NOT"]
    assert [row[1] for row in peeked.rows()] == [str(j) for j in ids]
    assert {row[5] for row in peeked.rows()} == {"no"}
    limited = (await relayq("jobs", "peek", "hook", "--limit", "2", "--json")).json()
    assert [int(p["job"]["jobId"]) for p in limited["jobs"]] == ids[:2]

    dry = await relayq("jobs", "abort", str(ids[0]), "--dry-run")
    assert dry.out == "dry run: would abort 1 job; nothing changed\n", dry.err
    assert fields((await relayq("jobs", "get", str(ids[0]))).out)["state"] == "pending"

    done = await relayq("jobs", "abort", str(ids[0]), "--reason", "bad data")
    assert done.out == "aborted 1 job\n", done.err
    after = (await relayq("jobs", "get", str(ids[0]), "--json")).json()
    assert after["state"] == "JOB_STATE_ABORTED"
    assert after["history"][-1]["reason"] == "bad data"
    assert after["history"][-1]["actor"].startswith("admin:")
    history = await relayq("jobs", "get", str(ids[0]))
    assert "bad data" in history.out.split("history:")[1]

    # An id that is not there is counted out and said so.
    partly = await relayq("jobs", "abort", str(ids[0]), str(ids[0] + 1000))
    assert partly.out == "aborted 0 jobs\n"
    assert "2 of the given ids" in partly.err

    counted = (await relayq("jobs", "retry", "--filter", "state = 'aborted'", "--dry-run",
                            "--json")).json()
    assert counted == {"matched": "1", "changed": "0", "dryRun": True}
    assert fields((await relayq("jobs", "get", str(ids[0]))).out)["state"] == "aborted"

    retried = await relayq("jobs", "retry", "--filter", "state = 'aborted'", "--reason", "fixed")
    assert retried.out == "retried 1 job\n", retried.err
    # Failed and due now: back in front of its user's later jobs, so their order holds.
    again = await relayq("jobs", "get", str(ids[0]))
    assert fields(again.out)["state"] == "failed"
    assert fields(again.out)["retry at"] != "-"


async def test_stats_per_destination_and_tenant(relayq: Relayq, database: str) -> None:
    ids = await _paused_pipeline(relayq, database, 3)
    await relayq("jobs", "abort", str(ids[2]))

    doc = (await relayq("stats", "--json")).json()
    [hook] = doc["destinations"]
    assert (hook["destinationId"], hook["tenantId"], hook["paused"]) == ("hook", "acme", True)
    assert hook["counts"] == {"pending": "2", "failed": "0", "waiting": "0", "succeeded": "0",
                              "aborted": "1"}
    assert hook["oldestPendingSeconds"] >= 0
    [acme] = doc["tenants"]
    assert acme["counts"]["pending"] == "2"

    shown = await relayq("stats", "--destination", "hook")
    destinations, tenants = shown.out.split("\n\n")
    assert destinations.splitlines()[0].split() == [
        "DESTINATION", "TENANT", "PENDING", "FAILED", "WAITING", "SUCCEEDED", "ABORTED",
        "OLDEST", "PENDING", "DELIVERED/S", "FAILED/S", "PAUSED"]
    assert destinations.splitlines()[1].split()[:7] == ["hook", "acme", "2", "0", "0", "0", "1"]
    assert tenants.splitlines()[1].split()[:6] == ["acme", "2", "0", "0", "0", "1"]

    # The whole log, for the operator: its size and its oldest event.
    log = doc["eventLog"]
    assert log["events"] == "3"
    assert int(log["bytes"]) > 0
    assert int(log["oldestEventId"]) == keyspace.event_of(ids[0])
    everything = await relayq("stats")
    assert re.search(r"^event log: 3 events, [0-9.]+ [kMG]B; oldest event "
                     rf"{keyspace.event_of(ids[0])}, 20", everything.out, re.MULTILINE)


async def test_a_failed_delivery_seen_and_retried(relayq: Relayq, world: World) -> None:
    """With a real router: the failed attempt shows in list and history, and `jobs retry`
    sends it again at once instead of a minute later."""
    await world.destination("hook", min_backoff_ms=60_000, max_backoff_ms=60_000)
    world.webhook.answer = lambda _: Answer(503, body="try later")
    async with ingest(world.database) as service, router(world.database):
        [job] = await send(service, world.source, [event("m1", "alice")])
        await world.webhook.wait_for(lambda: len(world.webhook.received) == 1)
        await _until(relayq, f"job_id = {job} AND state = 'failed'")

        listed = await relayq("jobs", "list", "--filter", "state = 'failed'")
        [row] = listed.rows()
        assert row[:8] == [str(job), "failed", "1", "acme", "hook", "alice", "m1", "503"]
        assert row[9].startswith("retry in ")

        shown = await relayq("jobs", "get", str(job))
        history = shown.out.split("history:\n")[1].splitlines()
        assert _cells(history[0]) == ["ATTEMPT", "STATE", "ERROR", "STARTED", "DURATION",
                                      "RETRY AT", "ACTOR", "REASON", "RESPONSE"]
        attempt = _cells(history[-1])
        assert attempt[:3] == ["1", "failed", "503"]
        assert attempt[-1] == "try later"
        assert any(cell.startswith("router:") for cell in attempt)

        world.webhook.answer = lambda _: OK
        retried = await relayq("jobs", "retry", str(job), "--reason", "sink is back")
        assert retried.out == "retried 1 job\n", retried.err
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1, within=20)
    assert world.webhook.oks[0].job_id == job


async def test_events_replay_and_a_backfill_from_the_cli(relayq: Relayq, world: World) -> None:
    """The README's walk-through: a dry run, a replay with a reason, followed to its end; a
    new destination connected with a backfill, followed with `replays get --watch`."""
    await world.destination("hook")
    async with ingest(world.database) as service, router(world.database):
        await send(service, world.source, [event(f"m{i}", f"u{i % 2}", n=i) for i in range(6)])
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 6)

        dry = await relayq("events", "replay", "web", "hook", "--filter", "properties.n >= 3",
                           "--dry-run")
        assert dry.out == "dry run: would send 3 events again; nothing changed\n", dry.err
        refused = await relayq("events", "replay", "web", "hook")
        assert refused.code == 1
        assert "reason: required" in refused.error
        done = await relayq("events", "replay", "web", "hook", "--filter", "properties.n >= 3",
                            "--reason", "the receiver lost them", "--watch")
        assert done.code == 0, done.err
        first = done.out.splitlines()[0]
        assert re.fullmatch(r"replay rpl-[0-9a-f]{12} started: 3 events", first), done.out
        assert "done, 3/3 delivered" in done.out
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 9)

        await factories.destination(world.conn, world.tenant, "late",
                                    endpoint=world.webhook.url, kind="webhook")
        connected = await relayq("connections", "connect", "web", "late",
                                 "--backfill-from", "earliest")
        backfill = re.search(r"backfill (bkf-[0-9a-f]{12}) started", connected.out)
        assert backfill is not None, connected.out
        watched = await relayq("replays", "get", backfill.group(1), "--watch")
        assert "progress" in watched.out
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 15)
        listed = await relayq("replays", "list")
        assert [row[1] for row in listed.rows()] == ["backfill", "replay"]


async def _until(relayq: Relayq, filter_: str, within: float = 20.0) -> None:
    """Poll `jobs list` until the filter matches a job."""

    async def matched() -> bool:
        return bool((await relayq("jobs", "list", "--filter", filter_, "--json")).json()["jobs"])

    await eventually(matched, within=within, every=0.2, what=f"a job matching {filter_}")


# ---------- a reader that goes away ----------

@pytest.mark.process
async def test_output_into_a_pipe_closed_early_ends_quietly(relayq: Relayq) -> None:
    """`relayq stats | head -3`: no BrokenPipeError traceback, the exit a SIGPIPE would give."""
    for n in range(40):
        assert (await relayq("tenants", "create", f"tenant-{n}")).code == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from relayq.cli import main; main()", "tenants", "list",
            "--admin", f"127.0.0.1:{relayq.port}", "--token", OPERATOR,
            stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert err.decode() == ""
    assert process.returncode == 141


# ---------- errors ----------

async def test_grpc_errors_print_the_code_and_exit_1(relayq: Relayq) -> None:
    wrong = await relayq("tenants", "list", token="not-a-token")
    assert (wrong.code, wrong.out) == (1, "")
    assert wrong.error.startswith("relayq: UNAUTHENTICATED: ")
    assert "Traceback" not in wrong.err

    missing = await relayq("tenants", "list", token=None)
    assert missing.code == 1
    assert missing.error.startswith("relayq: UNAUTHENTICATED: ")
    assert "--token or RELAYQ_ADMIN_TOKEN" in missing.error

    unknown = await relayq("jobs", "get", "123456789")
    assert unknown.code == 1
    assert unknown.error.startswith("relayq: NOT_FOUND: ")

    bad = await relayq("jobs", "list", "--filter", "state = 'failed' AND attempts >=")
    assert bad.code == 1
    assert bad.error.startswith("relayq: INVALID_ARGUMENT: ")
    # The position of the mistake reaches the user: column 33 is the end of the filter.
    assert "column 33" in bad.error


async def test_address_and_token_from_the_environment(
    relayq: Relayq, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAYQ_ADMIN_ADDRESS", f"127.0.0.1:{relayq.port}")
    monkeypatch.setenv("RELAYQ_ADMIN_TOKEN", OPERATOR)
    capsys.readouterr()
    assert await asyncio.to_thread(_exit_status, ["tenants", "create", "acme", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "acme"


async def test_a_server_that_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    code = await asyncio.to_thread(_exit_status, ["stats", "--admin", address, "--token", "x"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("relayq: UNAVAILABLE: ")
    assert f"is relayq-admin listening at {address}?" in err


@pytest.mark.parametrize("argv", [
    ["jobs", "retry"],
    ["jobs", "abort", "1", "--filter", "state = 'failed'"],
])
def test_retry_and_abort_need_ids_or_a_filter(argv: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any connection: the address points nowhere.
    assert _exit_status([*argv, "--admin", "127.0.0.1:1"]) == 2
    assert "give job ids or --filter" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["stats", "--admin", "no-port"],
    ["stats", "--ca-file", "/nonexistent/ca.pem"],
])
def test_bad_connection_options_exit_2(argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_status(argv) == 2
    assert capsys.readouterr().err.startswith("relayq: bad configuration: --")


# ---------- formatting ----------

@pytest.mark.parametrize(("text", "ms"), [
    ("500ms", 500), ("1.5s", 1500), ("30s", 30_000), ("2", 2000), ("5m", 300_000),
    ("3h", 10_800_000), ("1d", 86_400_000), (" 2S ", 2000),
])
def test_durations(text: str, ms: int) -> None:
    assert units.milliseconds(text) == ms


@pytest.mark.parametrize("text", ["", "5 minutes", "-1s", "1e3", "s", "10000000000s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        units.milliseconds(text)


def test_seconds_round_up() -> None:
    assert (units.seconds("500ms"), units.seconds("10m"), units.seconds("0")) == (1, 600, 0)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (60, "1m"), (312, "5m12s"), (3600, "1h"), (11040, "3h4m"),
    (183600, "2d3h"), (86400, "1d"),
])
def test_spans(seconds: float, text: str) -> None:
    assert render.span(seconds) == text


def test_ages() -> None:
    now = 1_800_000_000.0
    assert render.ago(Timestamp(seconds=int(now) - 312), now) == "5m12s ago"
    assert render.ago(Timestamp(seconds=int(now) + 30), now) == "in 30s"
    assert render.ago(Timestamp(seconds=int(now)), now) == "now"
    assert render.ago(Timestamp(), now) == "-"
    stamp = Timestamp(seconds=int(datetime(2026, 11, 25, 13, 38, 5, tzinfo=UTC).timestamp()))
    assert render.when(stamp).startswith("2026-11-25 13:38:05 UTC (")


def test_tables_align_columns_without_trailing_blanks(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    render.table(["ID", "STATE", "NOTE"], [["1", "pending", ""], ["12345", "failed", "x"]])
    assert capsys.readouterr().out == (
        "ID     STATE    NOTE\n"
        "1      pending\n"
        "12345  failed   x\n")


@pytest.mark.parametrize(("text", "pair"), [
    ("Authorization: Bearer a:b", ("Authorization", "Bearer a:b")),
    ("X-Key=abc==", ("X-Key", "abc==")),
    ("X-Both=a:b", ("X-Both", "a:b")),
])
def test_headers(text: str, pair: tuple[str, str]) -> None:
    assert parse_header(text) == pair


def test_a_header_needs_a_value() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_header("Authorization")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


async def test_tls_with_a_ca_file(database: str, certificate: tuple[Path, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = certificate
    async with admin(database, RELAYQ_TLS_CERT_FILE=str(cert),
                     RELAYQ_TLS_KEY_FILE=str(key)) as service:
        argv = ["tenants", "list", "--admin", f"127.0.0.1:{service.app.port}",
                "--token", OPERATOR, "--deadline", "5"]
        capsys.readouterr()
        # Plaintext to a TLS port fails; the CA file makes it work.
        assert await asyncio.to_thread(_exit_status, argv) == 1
        assert "relayq: UNAVAILABLE: " in capsys.readouterr().err
        assert await asyncio.to_thread(_exit_status, [*argv, "--ca-file", str(cert)]) == 0
        assert "no tenants\n" in capsys.readouterr().err
