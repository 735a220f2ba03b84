"""Each process's Prometheus /metrics, scraped after real traffic: the counters moved.

Real processes, so each /metrics shows only its own process's registry.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from psycopg import AsyncConnection

from relayq.v1 import admin_pb2, admin_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from tests import factories
from tests.cluster import sample, service
from tests.pipeline import FAST_RETRIES, World
from tests.poll import eventually
from tests.services import OPERATOR_TOKEN

pytestmark = pytest.mark.process


def events(prefix: str, count: int) -> list[ingest_pb2.Event]:
    return [ingest_pb2.Event(message_id=f"{prefix}-{n}", user_id=f"user-{n % 4}",
                             event="Metrics Test", payload_json=f'{{"n": {n}}}')
            for n in range(count)]


async def test_counters_move_after_traffic(world: World, conn: AsyncConnection[Any]) -> None:
    await world.destination("good")
    # Connection refused: every attempt is retried, so its jobs stay failed until aborted.
    dead = await factories.destination(conn, world.tenant, "dead",
                                       endpoint="http://127.0.0.1:9/", **FAST_RETRIES)
    await factories.connect(conn, world.source.key, dead)
    auth = (("authorization", f"Bearer {world.source.write_key}"),)
    operator = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)

    with service("ingest", world.database) as ingest, \
            service("router", world.database) as router, \
            service("admin", world.database) as admin:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
            stub = ingest_pb2_grpc.IngestStub(channel)
            batch = ingest_pb2.IngestRequest(events=events("m", 20))
            await stub.Ingest(batch, metadata=auth)
            again = await stub.Ingest(batch, metadata=auth)
            assert again.duplicates == 20
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Ingest(batch, metadata=(("authorization", "Bearer nope"),))

        await world.webhook.wait_for(lambda: len(world.webhook.oks) >= 20)

        async def dead_failed() -> bool:
            cur = await conn.execute("SELECT count(*) FROM jobs WHERE destination_key = %s"
                                     " AND state = 'failed'", (dead,))
            row = await cur.fetchone()
            return bool(row and row[0] > 0)

        await eventually(dead_failed)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{admin.port}") as channel:
            changed = await admin_pb2_grpc.AdminStub(channel).AbortJobs(
                admin_pb2.AbortJobsRequest(selector=admin_pb2.JobSelector(
                    filter="destination = 'dead'"), reason="metrics test"), metadata=operator)
            assert changed.changed > 0

        got = ingest.scrape()
        assert sample(got, "relayq_ingest_events_total", outcome="accepted") == 20
        assert sample(got, "relayq_ingest_events_total", outcome="duplicate") == 20
        assert sample(got, "relayq_ingest_rejects_total", reason="auth") == 1
        assert sample(got, "relayq_ingest_batch_events_count") == 2
        assert sample(got, "relayq_ingest_flush_seconds_count") >= 1

        got = router.scrape()
        assert sample(got, "relayq_router_deliveries_total", destination="good",
                      outcome="ok") == 20
        assert sample(got, "relayq_router_deliveries_total", destination="dead",
                      outcome="retry") >= 1
        assert sample(got, "relayq_router_delivery_seconds_count", type="webhook") >= 21
        assert sample(got, "relayq_router_end_to_end_seconds_count") == 20
        assert sample(got, "relayq_router_partitions_owned") > 0

        got = admin.scrape()
        assert sample(got, "relayq_admin_job_changes_total", action="abort") == changed.changed
        # Jobs by state per destination, from the stats query at scrape time.
        jobs = {(dest, state): sample(got, "relayq_jobs", tenant="acme", destination=dest,
                                      state=state)
                for dest in ("good", "dead")
                for state in ("pending", "failed", "waiting", "succeeded", "aborted")}
        assert jobs["good", "succeeded"] == 20
        assert jobs["dead", "succeeded"] == 0
        assert jobs["dead", "pending"] + jobs["dead", "failed"] + jobs["dead", "waiting"] == 0
        assert ("relayq_jobs", frozenset({"tenant": "acme", "destination": "good",
                                          "state": "pending"}.items())) in got
        # Job storage from the catalog: the partitions made ahead, holding these jobs.
        cur = await conn.execute(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'jobs'::regclass")
        partitions = (await cur.fetchone() or [0])[0]
        assert sample(got, "relayq_job_storage_partitions", table="jobs") == partitions >= 3
        assert sample(got, "relayq_job_storage_bytes", table="jobs") > 0
        assert sample(got, "relayq_job_storage_bytes", table="job_statuses") > 0
        assert sample(got, "relayq_job_storage_old_partitions", note="sparse") == 0
