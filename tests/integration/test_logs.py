"""Logs: one JSON object per line (level, logger, message and the fields given with
`extra=`) when read by a machine; readable text on a terminal; and the router's delivery
logs name the tenant, destination, job and attempt."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
from typing import Any

import orjson
import pytest

from relayq import logs
from relayq.v1 import ingest_pb2
from tests.cluster import service
from tests.pipeline import World, send, wait_until_finished
from tests.services import ingest
from tests.sinks import OK, Answer, Received

EMIT = ("from relayq import logs; import logging; logs.configure('info', 'auto');"
        " logging.getLogger('relayq.test').warning('job %s aborted', 7,"
        " extra={'tenant': 'acme', 'job_id': 7, 'attempt': 3})")


def record(message: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("relayq.test")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logger.makeRecord("relayq.test", logging.WARNING, __file__, 1, message, args,
                             exc_info, extra=extra)


def test_json_lines_have_level_logger_message_and_fields() -> None:
    line = logs.JSONFormatter().format(record("job %s aborted", 42, exc=True, tenant="acme",
                                              destination="d1", job_id=42, attempt=3))
    assert "\n" not in line.split('"exception"')[0]
    entry = orjson.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "relayq.test"
    assert entry["message"] == "job 42 aborted"
    assert (entry["tenant"], entry["destination"], entry["job_id"], entry["attempt"]) == (
        "acme", "d1", 42, 3)
    assert "ValueError: boom" in entry["exception"]
    assert entry["ts"].endswith("+00:00")


def test_text_lines_for_people() -> None:
    line = logs.TextFormatter().format(record("job %s aborted", 42, job_id=42, attempt=3))
    assert "WARNING" in line
    assert "relayq.test: job 42 aborted" in line
    assert line.endswith("job_id=42 attempt=3")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(line)


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    piped = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, env=env,
                           check=True)
    entry = orjson.loads(piped.stderr)
    assert entry["message"] == "job 7 aborted"
    assert entry["tenant"] == "acme"

    leader, follower = pty.openpty()
    try:
        child = subprocess.run([sys.executable, "-c", EMIT], stderr=follower, env=env,
                               check=True)
        assert child.returncode == 0
        text = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "relayq.test: job 7 aborted" in text
    assert "tenant=acme" in text
    assert not text.lstrip().startswith("{")


def test_configure_replaces_handlers_and_sets_the_level() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("error", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, logs.JSONFormatter)
        assert root.level == logging.ERROR
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


@pytest.mark.process
async def test_router_delivery_logs_carry_tenant_destination_job_and_attempt(
        world: World) -> None:
    def answer(delivery: Received) -> Answer:
        if delivery.message_id == "flaky" and delivery.attempt == 1:
            return Answer(503)
        if delivery.message_id == "refused":
            return Answer(400)
        return OK

    world.webhook.answer = answer
    await world.destination("d1")
    with service("router", world.database, metrics=False) as router:
        async with ingest(world.database) as ing:
            await send(ing, world.source, [
                ingest_pb2.Event(message_id=m, user_id=f"u-{m}", payload_json="{}")
                for m in ("flaky", "refused", "fine")])
            try:
                await wait_until_finished(world.conn, 3)
            except TimeoutError as exc:
                pytest.fail(f"{exc}\nrouter log:\n{router.log()[-4000:]}")
        router.process.terminate()
        text = router.log()

    entries = []
    for line in text.splitlines():
        if line.strip():
            entries.append(orjson.loads(line))  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)
    retried = [e for e in entries if e["message"] == "delivery failed; will retry"]
    aborted = [e for e in entries if e["message"] == "job aborted"]
    assert len(retried) == 1
    assert len(aborted) == 1
    for entry, level, attempt in ((retried[0], "info", 1), (aborted[0], "warning", 1)):
        assert entry["level"] == level
        assert entry["logger"] == "router_service.lane"
        assert entry["tenant"] == "acme"
        assert entry["destination"] == "d1"
        assert isinstance(entry["job_id"], int)
        assert entry["attempt"] == attempt
    assert retried[0]["error_code"] == "503"
    assert retried[0]["job_id"] != aborted[0]["job_id"]

