"""The README's grpcurl commands, run as grpcurl runs them: through server reflection alone.

A small reflection-based client (tests/grpcurl.py: no generated code, descriptors come from
the server) parses each command in the README's admin block and calls a real relayq-admin
process with it, so the documented commands keep working.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

from tests.grpcurl import grpcurl
from tests.helpers import event
from tests.pipeline import World, send, states
from tests.poll import eventually
from tests.services import OPERATOR_TOKEN, admin_process, ingest, router
from tests.sinks import OK, Answer, Received

README = Path(__file__).resolve().parents[2] / "README.md"
DOCUMENTED_ADDRESS = "127.0.0.1:50052"


def readme_commands() -> list[tuple[list[str], str | None]]:
    """(argv, stdin) of every grpcurl command between the README's grpcurl-admin markers."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- grpcurl-admin: begin -->")[1].split("<!-- grpcurl-admin: end -->")[0]
    lines = iter(block.splitlines())
    commands = []
    for line in lines:
        if not line.startswith("grpcurl "):
            continue
        stdin = None
        if line.endswith("<<'EOF'"):
            line = line.removesuffix("<<'EOF'")
            body = []
            for follow in lines:
                if follow == "EOF":
                    break
                body.append(follow)
            stdin = "\n".join(body)
        commands.append((shlex.split(line), stdin))
    return commands


def test_the_readme_documents_list_describe_listjobs_peekjobs_retryjobs() -> None:
    calls = [argv[-1] for argv, _ in readme_commands()]
    assert calls[:2] == ["list", "relayq.v1.Admin"]
    for method in ("ListJobs", "PeekJobs", "RetryJobs", "GetEvent", "ListEvents"):
        assert f"relayq.v1.Admin/{method}" in calls


async def test_readme_grpcurl_commands_work_through_reflection(world: World) -> None:
    await world.destination("demo-flaky", min_backoff_ms=600_000, max_backoff_ms=600_000)

    def answer(delivery: Received) -> Answer:
        return Answer(500, body="flaky") if delivery.attempt == 1 else OK

    world.webhook.answer = answer
    service = admin_process(world.database)
    address = f"127.0.0.1:{service.port}"
    env = {"RELAYQ_ADMIN_TOKEN": OPERATOR_TOKEN}
    try:
        async with ingest(world.database) as ingest_service, router(world.database):
            [job_id] = await send(ingest_service, world.source,
                                  [event("order-1001", "alice")])

            async def failed() -> bool:
                return (await states(world.conn)).get(job_id) == "failed"

            await eventually(failed, within=10, every=0.05, what=f"job {job_id} failed")
            results = []
            for argv, stdin in readme_commands():
                results.append(await asyncio.to_thread(
                    grpcurl, argv, stdin, {DOCUMENTED_ADDRESS: address}, env))
            listed, described, listed_jobs, peeked, dry, retried, found, events = results
            assert "relayq.v1.Admin" in listed
            assert "grpc.health.v1.Health" in listed
            assert {"ListJobs", "PeekJobs", "RetryJobs", "GetStats"} <= set(described)
            [job] = listed_jobs["jobs"]
            assert (job["jobId"], job["state"], job["errorCode"]) == (
                str(job_id), "JOB_STATE_FAILED", "500")
            [peek] = peeked["jobs"]
            assert peek["blockedReason"].startswith("retry at")
            assert dry == {"matched": "1", "dryRun": True}
            assert retried == {"matched": "1", "changed": "1"}
            assert found["event"]["messageId"] == "order-1001"
            assert [d["destinationId"] for d in found["destinations"]] == ["demo-flaky"]
            assert [e["messageId"] for e in events["events"]] == ["order-1001"]
            await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1)
    finally:
        service.close()
