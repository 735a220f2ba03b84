"""The event log in Postgres (jobsdb.eventlog, migration 0012): the horizon below which reads
are complete, reads for lagging destinations, fencing, taking partitions over, and the
migration of a database from before the log.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from jobsdb import eventlog, keyspace, leases, migrate
from jobsdb.errors import JobsDBError
from jobsdb.eventlog import Delivered, NewRow, Parked, Request, Wanted, WantedFor
from jobsdb.ingest import NewEvent, store_events
from router_service.logread import LogReader
from router_service.tracks import Positions
from tests import factories
from tests.helpers import event
from tests.pipeline import World, send, wait_until_finished
from tests.services import ingest, router
from tests.sinks import WebhookSink

NOW = datetime.now(UTC)
LEASE = timedelta(seconds=60)
EVERY_PARTITION = [Wanted(p, 0, 1000) for p in range(64)]


async def _setup(conn: AsyncConnection[Any]) -> tuple[factories.Source, int]:
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)
    destination = await factories.destination(conn, tenant, "d1")
    await factories.connect(conn, source.key, destination)
    return source, destination


async def _store(dsn: str, source: factories.Source, message_ids: list[str], user: str = "u"
                 ) -> list[int]:
    async with await AsyncConnection.connect(dsn) as conn:
        stored = await store_events(conn, [
            NewEvent(source.key, source.tenant_key, m, user, "{}") for m in message_ids],
            ordering_partitions=64)
        await conn.commit()
    return [s.event_id for s in stored if s.event_id is not None]


async def _read(dsn: str) -> eventlog.Read:
    async with await AsyncConnection.connect(dsn) as conn, conn.transaction():
        return await eventlog.read(conn, EVERY_PARTITION)


async def test_a_read_stops_below_a_writer_that_has_not_committed(
        database: str, conn: AsyncConnection[Any]) -> None:
    """Sequence values do not commit in order: a reader that went past an uncommitted
    writer's ids on a later id's commit would skip its events for good. The horizon holds
    reads below them until the writer ends; then everything is read, nothing skipped."""
    source, _ = await _setup(conn)
    early = await _store(database, source, ["e0"])
    writer = await AsyncConnection.connect(database)
    try:
        held = await store_events(writer, [NewEvent(source.key, source.tenant_key, "slow", "u",
                                                    "{}")], ordering_partitions=64)
        slow_id = held[0].event_id
        assert slow_id is not None
        later = await _store(database, source, ["e1", "e2"], user="v")
        assert min(later) > slow_id  # committed, with larger ids
        for _ in range(3):  # however often it reads meanwhile
            read = await _read(database)
            assert read.horizon <= slow_id
            assert [e.event_id for e in read.events] == early
        await writer.commit()
    finally:
        await writer.close()
    read = await _read(database)
    assert read.horizon > max(later)
    assert sorted(e.event_id for e in read.events) == sorted([*early, slow_id, *later])


async def test_a_writer_that_rolls_back_holds_nothing_back(
        database: str, conn: AsyncConnection[Any]) -> None:
    source, _ = await _setup(conn)
    async with await AsyncConnection.connect(database) as writer:
        await store_events(writer, [NewEvent(source.key, source.tenant_key, "gone", "u", "{}")],
                           ordering_partitions=64)
        await writer.rollback()
    kept = await _store(database, source, ["kept"])
    read = await _read(database)
    assert [e.event_id for e in read.events] == kept
    assert read.horizon == max(kept) + 1


async def test_the_horizon_ignores_other_databases_and_other_transactions(
        database: str, empty_database: str, conn: AsyncConnection[Any]) -> None:
    """Only writers of this database's log count: a long transaction elsewhere (another
    application's, a report) does not hold delivery back, as pg_snapshot_xmin would."""
    source, _ = await _setup(conn)
    async with await AsyncConnection.connect(empty_database) as other, \
            await AsyncConnection.connect(database) as busy:
        await other.execute("CREATE TABLE t (x int)")
        await other.execute("INSERT INTO t VALUES (1)")  # an open write transaction elsewhere
        await busy.execute("UPDATE tenants SET name = name")  # and one here, not a writer
        ids = await _store(database, source, ["m"])
        read = await _read(database)
        assert [e.event_id for e in read.events] == ids


async def test_a_lagging_destination_reads_only_its_share(
        database: str, conn: AsyncConnection[Any]) -> None:
    source, d1 = await _setup(conn)
    other = await factories.source(conn, source.tenant_key, "other")
    d2 = await factories.destination(conn, source.tenant_key, "d2")
    await factories.connect(conn, other.key, d2)
    await factories.connect(conn, source.key, d2)
    async with conn.transaction():
        stored = await store_events(conn, [
            NewEvent(source.key, source.tenant_key, "all", "u", "{}"),
            NewEvent(source.key, source.tenant_key, "to-d2", "u", "{}", (d2,)),
            NewEvent(other.key, source.tenant_key, "other", "u", "{}"),
        ], ordering_partitions=64)
    ids = [s.event_id for s in stored]
    partition = keyspace.partition_of("u", 64)
    found, _ = await eventlog.read_for(conn, [
        WantedFor(d1, partition, 0, max(ids), 100, (source.key,)),
        WantedFor(d2, partition, ids[0], max(ids), 100, (source.key, other.key))])
    assert [e.message_id for e in found[d1]] == ["all"]
    assert [e.message_id for e in found[d2]] == ["to-d2", "other"]


async def _write_everything(conn: AsyncConnection[Any], source: factories.Source,
                            destination: int, event_id: int, owner: str) -> None:
    """Every write a router makes of the log for `event_id` (of user "u"), as `owner`, in
    one transaction."""
    partition = keyspace.partition_of("u", 64)
    job_id = keyspace.job_id(event_id, 1)
    async with conn.transaction():
        await eventlog.record_deliveries(conn, [Delivered(
            destination, [event_id], [partition], [1],
            [Request(NOW, 3, "200", "")])], owner=owner, actor="router:" + owner)
        await eventlog.insert_rows(conn, [NewRow(
            job_id, destination, source.tenant_key, source.key, partition, "failed", NOW,
            NOW, 3, NOW, "u", "m", "503", "busy", None, None)], owner=owner, actor=owner)
        await eventlog.park(conn, [Parked(job_id + 1, destination, source.tenant_key,
                                          source.key, partition, NOW, "u", "m2")],
                            owner=owner)
        await eventlog.move_frontiers(conn, {partition: event_id}, owner=owner)
        await eventlog.move_cursors(conn, {(destination, partition): event_id},
                                    owner=owner)


async def _written(conn: AsyncConnection[Any]) -> dict[str, int]:
    """How many rows each table a router writes of the log has, and the highest frontier."""
    counts = {}
    for table in ("deliveries", "jobs", "job_statuses", "destination_cursors"):
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        counts[table] = (await cur.fetchone() or [0])[0]
    cur = await conn.execute("SELECT max(frontier) FROM router_leases")
    counts["frontier"] = (await cur.fetchone() or [0])[0]
    return counts


async def test_a_router_without_the_lease_writes_nothing(
        database: str, conn: AsyncConnection[Any]) -> None:
    """Everything a router writes of the log is fenced by its leases: a router that lost
    its partitions (another router owns them) can neither move a cursor nor record a
    delivery nor write a row, so the new owner's picture is never changed behind it."""
    source, destination = await _setup(conn)
    [event_id] = await _store(database, source, ["m"])
    await leases.acquire(conn, "owner", LEASE, 64)
    await _write_everything(conn, source, destination, event_id, "stale")
    assert set((await _written(conn)).values()) == {0}
    await _write_everything(conn, source, destination, event_id, "owner")
    assert 0 not in (await _written(conn)).values()


async def _expire(conn: AsyncConnection[Any]) -> None:
    """Every lease runs out, as when its router could not renew (Postgres unreachable)."""
    await conn.execute("UPDATE router_leases SET expires_at = now() - interval '1 second'"
                       " WHERE owner IS NOT NULL")


async def test_a_lease_that_ran_out_untaken_still_fences_in_its_owner(
        database: str, conn: AsyncConnection[Any]) -> None:
    """Fenced by owner, not expiry: a router whose leases ran out while Postgres could not
    be reached, and that nobody took meanwhile, records what it delivered (else it would be
    delivered again). Once another router has taken them, it records nothing more."""
    source, destination = await _setup(conn)
    first, second = await _store(database, source, ["m", "n"])
    await leases.acquire(conn, "old", LEASE, 64)
    await _expire(conn)
    assert await eventlog.leased(conn, owner="old") == set(range(64))
    await _write_everything(conn, source, destination, first, "old")
    recorded = await _written(conn)
    assert 0 not in recorded.values()
    assert recorded["frontier"] == first
    assert await leases.acquire(conn, "new", LEASE, 64) == set(range(64))
    assert await eventlog.leased(conn, owner="old") == set()
    await _write_everything(conn, source, destination, second, "old")
    assert await _written(conn) == recorded


async def test_acquire_passes_by_a_lease_a_writer_holds_and_the_writer_waits_for_acquire(
        database: str, conn: AsyncConnection[Any]) -> None:
    """Why fencing by owner is safe, against real Postgres: a writer's FOR KEY SHARE on its
    lease rows makes another router's acquire (FOR UPDATE SKIP LOCKED) pass them by, expired
    as they are, until the writer commits; the owner's own renewals go on meanwhile. And a
    writer that comes while an acquire is open waits for it, then finds the owner changed
    and writes nothing (READ COMMITTED re-checks the row it waited for)."""
    source, _ = await _setup(conn)
    first, second = await _store(database, source, ["m", "n"])
    partition = keyspace.partition_of("u", 64)
    await leases.acquire(conn, "old", LEASE, 64)
    await _expire(conn)
    await conn.execute("SET lock_timeout = '5s'")
    async with await AsyncConnection.connect(database) as writer, \
            await AsyncConnection.connect(database) as acquirer:
        assert await eventlog.leased(writer, owner="old") == set(range(64))  # not committed
        assert await leases.acquire(conn, "new", LEASE, 64) == set()
        # A renewal (an update of a non-key column) does not wait for the writer, and the
        # writer's lock stays on the row's new version: still passed by once it ran out.
        await conn.execute("UPDATE router_leases SET expires_at = now() + interval '1 hour'")
        await _expire(conn)
        assert await leases.acquire(conn, "new", LEASE, 64) == set()
        assert await eventlog.move_frontiers(writer, {partition: first},
                                             owner="old") == {partition}
        await writer.commit()
        # The other way round: an acquire not yet committed, and the old owner writes.
        assert await leases.acquire(acquirer, "new", LEASE, 64) == set(range(64))
        waiting = asyncio.create_task(eventlog.move_frontiers(writer, {partition: second},
                                                              owner="old"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await acquirer.commit()
        assert await asyncio.wait_for(waiting, 5) == set()
        await writer.commit()
    cur = await conn.execute("SELECT frontier, owner FROM router_leases WHERE partition = %s",
                             (partition,))
    assert await cur.fetchone() == (first, "new")


async def test_taking_over_finds_what_is_settled_above_the_frontier(
        database: str, conn: AsyncConnection[Any]) -> None:
    """A router moves a frontier only as far as every destination is settled; what it
    delivered or wrote beyond is loaded by the next owner, so it is not delivered again."""
    source, destination = await _setup(conn)
    ids = await _store(database, source, ["a", "b", "c"])
    partition = keyspace.partition_of("u", 64)
    await leases.acquire(conn, "r", LEASE, 64)
    async with conn.transaction():
        await eventlog.record_deliveries(conn, [Delivered(
            destination, [ids[2]], [partition], [1], [Request(NOW, 3, "200", "")])],
            owner="r", actor="router:r")
        await eventlog.insert_rows(conn, [NewRow(
            keyspace.job_id(ids[1], 1), destination, source.tenant_key, source.key, partition,
            "failed", NOW, NOW, 3, NOW, "u", "b", "503", None, None, None)], owner="r",
            actor="router:r")
        await eventlog.move_frontiers(conn, {partition: ids[0]}, owner="r")
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        taken = await eventlog.take_over(conn, [partition])
    assert taken.frontiers[partition] == ids[0]
    assert taken.settled == {(destination, partition): {ids[1], ids[2]}}
    assert taken.blocked == {(destination, "u"): keyspace.job_id(ids[1], 1)}


async def test_the_partition_of_a_user_is_the_same_in_python_and_in_postgres(
        conn: AsyncConnection[Any]) -> None:
    users = [f"user-{i}" for i in range(200)] + ["", "ünïcode", "a" * 300]
    cur = await conn.execute(
        "SELECT u, ordering_partition_of(u, 64) FROM unnest(%s::text[]) AS u", (users,))
    assert {u: p for u, p in await cur.fetchall()} == {
        u: keyspace.partition_of(u, 64) for u in users}


async def test_held_open_ingest_transaction_is_delivered_in_order_after_passes(
        world: World) -> None:
    """A router keeps reading while an ingest transaction stays open: nothing after the
    open one's events is delivered meanwhile (their ids could go ahead of it), and once it
    commits, its event and everything after arrive, each user's in order."""
    await world.destination("hook")
    writer = await AsyncConnection.connect(world.database)
    try:
        async with ingest(world.database) as service, router(world.database) as relay:
            engine = relay.app.engine
            assert engine is not None
            held = await store_events(writer, [NewEvent(
                world.source.key, world.source.tenant_key, "slow", "alice",
                '{"messageId": "slow", "userId": "alice"}')], ordering_partitions=64)
            slow_id = held[0].event_id
            assert slow_id is not None
            await send(service, world.source, [event("a2", "alice"), event("b1", "bob")])
            passes = engine.log.reads
            while engine.log.reads < passes + 3:  # several reads of the log go by
                engine.log.wake()
                await asyncio.sleep(0.05)
            assert world.webhook.received == []
            await writer.commit()
            await world.webhook.wait_for(lambda: len(world.webhook.oks) == 3)
    finally:
        await writer.close()
    got = [(r.user_id, r.message_id) for r in world.webhook.oks]
    assert [m for u, m in got if u == "alice"] == ["slow", "a2"]
    assert [m for u, m in got if u == "bob"] == ["b1"]
    await wait_until_finished(world.conn, 3)


async def _old_schema(dsn: str) -> None:
    """Migrations 1-11 only: a database as relayq left it before the event log."""
    async with await AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("""CREATE TABLE relayq_migrations (
            version integer PRIMARY KEY, name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
        for m in migrate.available():
            if m.version < 12:
                await conn.execute(m.sql)
                await conn.execute("INSERT INTO relayq_migrations (version, name)"
                                   " VALUES (%s, %s)", (m.version, m.name))
        await conn.execute("CREATE TABLE jobs_p00000000 PARTITION OF jobs"
                           " FOR VALUES FROM (0) TO (1000000)")
        await conn.execute("CREATE TABLE job_statuses_p00000000 PARTITION OF job_statuses"
                           " FOR VALUES FROM (0) TO (1000000)")


async def test_migrating_a_backlog(empty_database: str) -> None:
    """The old schema with a backlog: alice has a failed job and two jobs waiting behind it
    at d1 and pending ones at d2; bob has a succeeded job and a pending one. After the
    migration, the unfinished ones are events of the log with rows where they need them, and
    a router delivers them in each user's order, before newer events of the same users."""
    await _old_schema(empty_database)
    async with await AsyncConnection.connect(empty_database, autocommit=True) as conn:
        tenant = await factories.tenant(conn)
        source = await factories.source(conn, tenant)
        d1 = await factories.destination(conn, tenant, "d1")
        d2 = await factories.destination(conn, tenant, "d2")
        for d in (d1, d2):
            await conn.execute("INSERT INTO connections (source_key, destination_key)"
                               " VALUES (%s, %s)", (source.key, d))
        old = [  # job_id, destination, user, message, state, attempts, blocked_by
            (1, d1, "alice", "a1", "failed", 2, None),
            (2, d2, "alice", "a1", "pending", 0, None),
            (3, d1, "bob", "b1", "succeeded", 1, None),
            (4, d1, "alice", "a2", "waiting", 0, 1),
            (5, d2, "alice", "a2", "pending", 0, None),
            (6, d1, "bob", "b2", "pending", 0, None),
            (7, d1, "alice", "a3", "waiting", 0, 1),
        ]
        for job_id, d, user, message, state, attempts, blocked in old:
            await conn.execute(
                "INSERT INTO jobs (job_id, destination_key, tenant_key, source_key,"
                " ordering_partition, state, attempts, blocked_by, retry_at, user_id,"
                " message_id, payload) VALUES (%s, %s, %s, %s, 0, %s, %s, %s,"
                " CASE WHEN %s = 'failed' THEN now() END, %s, %s, %s)",
                (job_id, d, tenant, source.key, state, attempts, blocked, state, user, message,
                 psycopg.types.json.Jsonb({"messageId": message, "userId": user})))
        await conn.execute("INSERT INTO job_statuses (job_id, attempt, state, error_code,"
                           " started_at, actor) VALUES (1, 2, 'failed', '503', now(), 'r')")
        await migrate.migrate(conn)
        cur = await conn.execute("SELECT message_id, destinations FROM events ORDER BY event_id")
        assert await cur.fetchall() == [("a1", [d1, d2]), ("a2", [d1, d2]), ("b2", [d1]),
                                        ("a3", [d1])]
        cur = await conn.execute("SELECT message_id, state::text, attempts, blocked_by IS NULL"
                                 " FROM jobs ORDER BY job_id")
        assert await cur.fetchall() == [("a1", "failed", 2, True), ("a2", "waiting", 0, False),
                                        ("a3", "waiting", 0, False)]
        cur = await conn.execute("SELECT count(*) FROM job_statuses")
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT count(*) FROM jobs_v1")
        assert await cur.fetchone() == (7,)
        sink = WebhookSink()
        await sink.start()
        try:
            await conn.execute("UPDATE destinations SET endpoint = %s, min_backoff_ms = 20,"
                               " max_backoff_ms = 100", (sink.url,))
            async with ingest(empty_database) as service, router(empty_database):
                await send(service, source, [event("a4", "alice"), event("b3", "bob")])
                await sink.wait_for(lambda: len(sink.oks) == 10)
        finally:
            await sink.stop()
    seen = [(r.job_id & 0xFFFF, r.user_id, r.message_id) for r in sink.oks]
    # d1 is slot 1, d2 slot 2 (numbered in order of connecting).
    assert [m for slot, u, m in seen if slot == 1 and u == "alice"] == ["a1", "a2", "a3", "a4"]
    assert [m for slot, u, m in seen if slot == 1 and u == "bob"] == ["b2", "b3"]
    assert [m for slot, u, m in seen if slot == 2 and u == "alice"] == ["a1", "a2", "a4"]
    assert [m for slot, u, m in seen if slot == 2 and u == "bob"] == ["b3"]


async def _log_reader(database: str, positions: Positions, handed: list[Any],
                      ensure_config: Any) -> tuple[LogReader, AsyncConnectionPool]:
    pool = AsyncConnectionPool(database, min_size=1, max_size=2, open=False)
    await pool.open()
    reader = LogReader(pool, positions, batch=100, window=1 << 40, window_bytes=1 << 30,
                       poll_seconds=1.0, usable=lambda: range(64), fan_out=handed.extend,
                       on_stalled=lambda partition, holders: False,
                       full=lambda holders: False, ensure_config=ensure_config)
    return reader, pool


async def test_a_read_whose_connections_cannot_be_loaded_moves_no_position(
        database: str, conn: AsyncConnection[Any]) -> None:
    """The connections are loaded (when the read saw newer ones) before the read's positions
    move: a load that fails leaves them where they were, so the read is made again, instead
    of the partition having been read past events never handed out (which a cursor write
    would then record as decided)."""
    source, _ = await _setup(conn)
    stored = await _store(database, source, ["a", "b"])
    positions = Positions()
    for partition in range(64):
        positions.take(partition, 0, {}, {})
    handed: list[Any] = []

    async def unreachable(version: int) -> None:
        raise JobsDBError("the connections could not be loaded")

    reader, pool = await _log_reader(database, positions, handed, unreachable)
    try:
        with pytest.raises(JobsDBError):
            await reader._read_once()
        assert all(position == 0 for position in positions.position.values())
        assert handed == []

        async def loaded(version: int) -> None:
            return None

        reader.ensure_config = loaded
        await reader._read_once()
        assert sorted(e.event_id for e in handed) == sorted(stored)
    finally:
        await pool.close()


async def test_a_read_is_not_applied_to_a_partition_taken_again_while_it_ran(
        database: str, conn: AsyncConnection[Any]) -> None:
    """A partition dropped and taken again while a read of it ran starts over from its
    frontier: what the read found is not handed out for it, nor its position moved."""
    source, _ = await _setup(conn)
    stored = await _store(database, source, ["a"])
    positions = Positions()
    for partition in range(64):
        positions.take(partition, 0, {}, {})
    handed: list[Any] = []

    async def retaken_meanwhile(version: int) -> None:
        for partition in range(64):
            positions.drop(partition)
            positions.take(partition, 0, {}, {})

    reader, pool = await _log_reader(database, positions, handed, retaken_meanwhile)
    try:
        await reader._read_once()
        assert handed == []
        assert all(position == 0 for position in positions.position.values())
        assert stored
    finally:
        await pool.close()
