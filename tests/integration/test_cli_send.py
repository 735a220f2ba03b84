"""`relayq send` as a user runs it: a real process, a real ingest, files of JSON lines."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from psycopg import AsyncConnection

from relayq.ports import free_port
from tests import factories
from tests.services import ingest

RELAYQ = [sys.executable, "-c", "from relayq.cli import main; main()", "send"]


async def relayq_send(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"",
                      stderr: int | None = None) -> tuple[int, str, str]:
    child = await asyncio.create_subprocess_exec(
        *RELAYQ, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(child.communicate(stdin), 120)
    assert child.returncode is not None
    return child.returncode, out.decode(), (err or b"").decode()


def line(**fields: Any) -> bytes:
    return orjson.dumps(fields) + b"\n"


async def stored(conn: AsyncConnection[Any]) -> int:
    """Events in the log (each stored once, whatever it fans out to)."""
    cur = await conn.execute("SELECT count(*) FROM events")
    return int((await cur.fetchone() or [0])[0])


async def test_a_file_of_100000_events_with_some_bad_lines(
    database: str, conn: AsyncConnection[Any], web: factories.Source, tmp_path: Path
) -> None:
    """Bad lines of every kind are reported with their line numbers and written to
    --rejected; every other event is stored once; the exit status says something failed."""
    bad = {
        1_000: b"{not json\n",
        20_000: b'["an", "array"]\n',
        30_000: line(user_id="u1", evnt="typo"),
        40_000: line(event="no user"),
        50_000: line(user_id="u1", event="e", destination_ids=["nope"]),  # the server's call
        60_000: line(user_id="u1", event="e", properties={"x": "y" * 70_000}),
    }
    events = tmp_path / "events.jsonl"
    with events.open("wb") as out:
        for number in range(1, 100_001):
            if number in bad:
                out.write(bad[number])
            elif number == 70_000:  # the same message id as line 2: a duplicate
                out.write(line(user_id="user-1", event="e", message_id="m-2"))
            else:
                out.write(line(user_id=f"user-{number % 1000}", event="Order Completed",
                               type="track", message_id=f"m-{number}",
                               properties={"n": number, "sku": "sku-0042"}))
            if number == 50:
                out.write(b"\n")  # blank lines are skipped
    rejected = tmp_path / "rejected.jsonl"
    async with ingest(database) as service:
        started = time.monotonic()
        status, out, err = await relayq_send(
            str(events), "--rejected", str(rejected), "--batch-events", "1000",
            env={"RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{service.app.port}",
                 "RELAYQ_WRITE_KEY": web.write_key})
        elapsed = time.monotonic() - started
    assert status == 1, err
    assert "100,000 events read" in out
    assert "accepted           99,993" in out
    assert "duplicates         1 " in out
    assert "rejected           6" in out
    assert "not acknowledged   0" in out
    assert "first problem: line 1001: invalid JSON" in out  # the blank line 51 counts
    assert f"6 events not stored are in {rejected}" in out
    assert err == ""  # no progress bar off a terminal
    records = sorted((json.loads(r) for r in rejected.read_text().splitlines()),
                     key=lambda r: r["line"])
    assert [(r["line"], r["status"]) for r in records] == [
        (n + (1 if n > 50 else 0), "rejected") for n in sorted(bad)]
    reasons = [r["reason"] for r in records]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1] == "expected a JSON object, got list"
    assert reasons[2].startswith("unknown field 'evnt'")
    assert reasons[3] == "user_id: one of user_id or anonymous_id is required"
    assert "'nope' is not a destination connected to source 'web'" in reasons[4]
    assert "over the limit of 65536" in reasons[5]
    # Events the server or send() judged are written with their message id, ready to resend.
    assert records[4]["event"]["message_id"]
    assert records[0]["text"] == "{not json\n"
    assert await stored(conn) == 99_993
    print(f"relayq send: 100,000 events in {elapsed:.1f}s")


async def test_stdin_and_a_clean_run_exit_0(
    database: str, conn: AsyncConnection[Any], web: factories.Source
) -> None:
    data = b"".join(line(userId=f"u{i}", event="e", messageId=f"s-{i}",
                         timestamp="2026-05-01T10:00:00Z") for i in range(50))
    async with ingest(database) as service:
        env = {"RELAYQ_WRITE_KEY": web.write_key}
        address = f"127.0.0.1:{service.app.port}"
        status, out, _ = await relayq_send("--ingest", address, env=env, stdin=data)
        assert status == 0
        assert "accepted           50" in out
        # The same lines again: all duplicates, still a success.
        status, out, _ = await relayq_send("--ingest", address, "-", env=env, stdin=data)
        assert status == 0
        assert "duplicates         50 " in out
    assert await stored(conn) == 50


async def test_events_never_acknowledged_are_written_to_rejected_and_fail_the_run(
    tmp_path: Path
) -> None:
    rejected = tmp_path / "rejected.jsonl"
    status, out, _ = await relayq_send(
        "--ingest", f"127.0.0.1:{free_port()}", "--write-key", "rq_wk_x", "--timeout", "1",
        "--rejected", str(rejected), stdin=line(user_id="u1", event="e", message_id="m1"))
    assert status == 1
    assert "not acknowledged   1" in out
    (record,) = [json.loads(r) for r in rejected.read_text().splitlines()]
    assert record["status"] == "not acknowledged"
    assert record["reason"].startswith("no acknowledgement after")
    # Nothing listens there: refused at once, or, on a loaded machine, not even refused
    # within the one second a try may take.
    assert ("UNAVAILABLE: failed to connect" in record["reason"]
            or "DEADLINE_EXCEEDED" in record["reason"]), record["reason"]
    assert record["event"]["message_id"] == "m1"


async def test_a_wrong_write_key_is_refused_once_not_left_unacknowledged(
    database: str, conn: AsyncConnection[Any], web: factories.Source, tmp_path: Path
) -> None:
    """Ingest answers a wrong key with UNAUTHENTICATED for every batch: the events are
    counted refused (not "not acknowledged": ingest did answer), said once in the summary,
    and not logged again for each batch (eight users: several lanes, several batches)."""
    rejected = tmp_path / "rejected.jsonl"
    data = b"".join(line(user_id=f"u{i}", event="e", message_id=f"k-{i}") for i in range(8))
    async with ingest(database) as service:
        status, out, err = await relayq_send(
            "--ingest", f"127.0.0.1:{service.app.port}", "--rejected", str(rejected),
            env={"RELAYQ_WRITE_KEY": web.write_key + "-wrong"}, stdin=data)
    assert status == 1
    assert "refused            8  (the write key or the source: nothing stored)" in out
    assert "not acknowledged   0" in out
    assert ("ingest refused the write key (--write-key or RELAYQ_WRITE_KEY): UNAUTHENTICATED"
            in out)
    assert "UNAUTHENTICATED" not in err, err  # no log line per batch
    records = [json.loads(r) for r in rejected.read_text().splitlines()]
    assert sorted(r["event"]["message_id"] for r in records) == [f"k-{i}" for i in range(8)]
    assert {r["status"] for r in records} == {"refused"}
    assert await stored(conn) == 0


@pytest.mark.parametrize(("args", "env", "message"), [
    ((), {}, "RELAYQ_WRITE_KEY: no write key"),
    (("--write-key", "k", "missing.jsonl"), {}, "missing.jsonl: no such file"),
    (("--write-key", "k", "--ingest", "nowhere"), {}, "--ingest: expected host:port"),
    (("--write-key", "k", "--batch-events", "5000"), {}, "batch_events: 5000 is outside"),
])
async def test_bad_options_stop_with_status_2_and_a_message(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    status, _, err = await relayq_send(*args, env={"RELAYQ_WRITE_KEY": "", **env})
    assert status == 2
    assert message in err
    assert "Traceback" not in err


async def test_a_progress_line_on_a_terminal(
    database: str, web: factories.Source, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"".join(line(user_id=f"u{i}", event="e") for i in range(2000)))
    leader, follower = pty.openpty()
    try:
        async with ingest(database) as service:
            status, _, _ = await relayq_send(
                str(events), stderr=follower,
                env={"RELAYQ_INGEST_ADDRESS": f"127.0.0.1:{service.app.port}",
                     "RELAYQ_WRITE_KEY": web.write_key})
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed, all was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert status == 0
    text = shown.decode()
    assert "\rrelayq send: 2,000 read · 2,000 accepted · 0 duplicates · 0 rejected" in text
    assert "events/s" in text
