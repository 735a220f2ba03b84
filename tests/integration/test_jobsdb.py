"""The Postgres layer on its own: migrations, partitions, de-duplication, the write path."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg import errors as pgerrors

from jobsdb import dedupe, destinations, errors, jobs, maintenance, migrate, partitions
from jobsdb.ingest import NewEvent, store_events
from jobsdb.keyspace import partition_of
from tests import factories
from tests.helpers import count


async def test_three_processes_migrating_at_once_apply_each_migration_once(
    empty_database: str,
) -> None:
    async def one() -> list[migrate.Migration]:
        async with await AsyncConnection.connect(empty_database, autocommit=True) as conn:
            return await migrate.migrate(conn)

    results = await asyncio.gather(one(), one(), one())
    applied = sorted(len(r) for r in results)
    assert applied == [0, 0, len(migrate.available())]
    async with await AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await migrate.current_version(conn) == migrate.available()[-1].version
        cur = await conn.execute("SELECT count(*) FROM relayq_migrations")
        assert (await cur.fetchone() or [0])[0] == len(migrate.available())


async def test_prepare_refuses_an_outdated_schema_when_told_not_to_migrate(
    empty_database: str,
) -> None:
    with pytest.raises(migrate.SchemaOutdated, match="run `relayq migrate`"):
        await migrate.prepare(empty_database, apply=False, wait_seconds=5, application_name="test")


async def test_prepare_gives_up_on_an_unreachable_database_naming_the_wait() -> None:
    with pytest.raises(errors.DatabaseUnavailable, match="did not answer within 1s"):
        await migrate.prepare("postgresql://postgres@127.0.0.1:9/nothing", apply=True,
                              wait_seconds=1, application_name="test")


async def test_partitions_are_created_ahead_of_the_sequence(conn: AsyncConnection[Any]) -> None:
    created = await partitions.ensure(conn, upto_event_id=3_500_000)
    # Event 3,500,000 is in partition 3; two more are kept ready beyond it. The log, the
    # deliveries of its events, and the rows and history of their jobs go together.
    assert created == [
        f"{table}_p{n:08d}" for table in ("events", "deliveries", "jobs", "job_statuses")
        for n in (3, 4, 5)]
    assert await partitions.ensure(conn, upto_event_id=3_500_000) == []
    cur = await conn.execute(
        "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = ANY(%s)"
        " ORDER BY relname", (["events_p00000003", "jobs_p00000003"],))
    # A job's id is its event's << 16: partition n of jobs holds partition n's events' jobs.
    assert [r[0] for r in await cur.fetchall()] == [
        "FOR VALUES FROM ('3000000') TO ('4000000')",
        f"FOR VALUES FROM ('{3_000_000 << 16}') TO ('{4_000_000 << 16}')"]


async def test_writing_past_the_last_partition_is_a_missing_partition_error(
    conn: AsyncConnection[Any],
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        await factories.insert_jobs(conn, 1, start=10_000_000)
    assert isinstance(errors.translate(caught.value), errors.MissingPartition)


async def test_a_key_is_a_duplicate_for_the_whole_window_and_forgotten_after(
    conn: AsyncConnection[Any],
) -> None:
    tenant = await factories.tenant(conn)
    source = await factories.source(conn, tenant)

    async def accepted(message_id: str) -> bool:
        event = NewEvent(source.key, tenant, message_id, "u", "{}", ())
        async with conn.transaction():
            (stored,) = await store_events(conn, [event], ordering_partitions=64)
        return not stored.duplicate

    assert await accepted("old")
    assert await accepted("resent")
    window = timedelta(hours=1)
    # A quarter window later a new generation starts; both keys are still remembered.
    await conn.execute("UPDATE dedup_generations SET started_at = now() - interval '20 minutes'")
    assert await dedupe.rotate(conn, window=window)
    assert not await dedupe.rotate(conn, window=window)  # too soon for another
    assert await accepted("new")
    # A duplicate sent again is remembered from its latest sighting (a client still retrying).
    assert not await accepted("resent")
    # Once the generation after the one holding "old" is older than the window, it goes.
    await conn.execute(
        "UPDATE dedup_generations SET started_at = now() - interval '61 minutes'"
        " WHERE generation = 2")
    await conn.execute(
        "UPDATE dedup_generations SET started_at = now() - interval '80 minutes'"
        " WHERE generation = 1")
    assert await dedupe.rotate(conn, window=window)
    cur = await conn.execute("SELECT generation FROM dedup_generations ORDER BY 1")
    assert [r[0] for r in await cur.fetchall()] == [2, 3]
    assert await accepted("old")
    assert not await accepted("new")
    assert not await accepted("resent")


async def test_a_flush_writes_each_new_event_once_in_input_order_with_its_partition(
    tx: AsyncConnection[Any],
) -> None:
    """Named destinations (in the order named), an event for every connection, a duplicate
    within the flush and one already seen: each new event is one row of the log, ids follow
    input order, each in its user's ordering partition, the document as given; no job rows."""
    tenant = await factories.tenant(tx)
    source = await factories.source(tx, tenant)
    d1 = await factories.destination(tx, tenant, "d1")
    d2 = await factories.destination(tx, tenant, "d2")
    async with tx.transaction():
        await store_events(tx, [NewEvent(source.key, tenant, "seen", "u0", "{}", (d1,))],
                           ordering_partitions=64)
    events = [
        NewEvent(source.key, tenant, "e1", "alice", '{"n": 1}', (d1, d2)),
        NewEvent(source.key, tenant, "seen", "u0", "{}", (d1,)),
        NewEvent(source.key, tenant, "e2", "bob", '{"n":  2}'),
        NewEvent(source.key, tenant, "e1", "alice", '{"n": 1}', (d1, d2)),
        NewEvent(source.key, tenant, "e3", "carol", '{"n": 3}', (d2, d1)),
    ]
    async with tx.transaction():
        stored = await store_events(tx, events, ordering_partitions=64)
    assert [s.duplicate for s in stored] == [False, True, False, True, False]
    assert [s.event_id is None for s in stored] == [False, True, False, True, False]
    ids = [s.event_id for s in stored if s.event_id is not None]
    assert ids == sorted(ids)
    cur = await tx.execute(
        "SELECT event_id, source_key, tenant_key, ordering_partition, user_id, message_id,"
        " destinations, document FROM events WHERE event_id = ANY(%s) ORDER BY event_id",
        (ids,))
    assert await cur.fetchall() == [
        (ids[0], source.key, tenant, partition_of("alice", 64), "alice", "e1", [d1, d2],
         '{"n": 1}'),
        (ids[1], source.key, tenant, partition_of("bob", 64), "bob", "e2", None, '{"n":  2}'),
        (ids[2], source.key, tenant, partition_of("carol", 64), "carol", "e3", [d2, d1],
         '{"n": 3}'),
    ]
    assert await count(tx, "events") == 4  # with "seen"
    assert await count(tx, "jobs") == 0
    # A new sighting of a stored event is a duplicate whatever destinations it names.
    async with tx.transaction():
        (again,) = await store_events(
            tx, [NewEvent(source.key, tenant, "e2", "bob", "{}", (d1,))],
            ordering_partitions=64)
    assert again.duplicate


async def test_maintenance_runs_in_one_process_at_a_time(database: str) -> None:
    policy = maintenance.Policy(dedupe_window=timedelta(hours=1), retention=timedelta(days=1))
    results = await asyncio.gather(*(
        maintenance.run_once(database, policy, application_name="test") for _ in range(4)))
    assert results.count(True) >= 1
    # Whoever ran, the partitions ahead exist.
    async with await AsyncConnection.connect(database, autocommit=True) as conn:
        assert await partitions.ensure(conn) == []


def test_ordering_partitions_are_stable_and_spread() -> None:
    # Fixed values: a change here would move keys between routers across an upgrade (and
    # away from the partition the log already holds a user's events in).
    assert partition_of("alice", 64) == partition_of("alice", 64) == 50
    assert partition_of("user-42", 64) == 7
    spread = {partition_of(f"user-{i}", 64) for i in range(2000)}
    assert len(spread) == 64


async def test_old_delivery_counts_fold_into_one_row_per_destination_keeping_totals(
        conn: AsyncConnection[Any]) -> None:
    tenant = await factories.tenant(conn)
    key = await factories.destination(conn, tenant, "hook")
    await conn.execute(
        "INSERT INTO delivery_counts (destination_key, bucket, succeeded, failed, aborted)"
        " SELECT %s, now() - make_interval(mins => m), 10, 2, 1"
        " FROM generate_series(0, 30) AS m", (key,))
    await conn.commit()
    await jobs.fold_counts(conn)
    await jobs.fold_counts(conn)  # folding again changes nothing
    cur = await conn.execute(
        "SELECT count(*), sum(succeeded)::int, sum(failed)::int, sum(aborted)::int,"
        " count(*) FILTER (WHERE bucket = '-infinity') FROM delivery_counts")
    # Buckets of the last ten minutes stay (for recent rates); 21 older ones became one row.
    assert await cur.fetchone() == (11, 310, 62, 31, 1)


def test_a_deadlock_or_serialization_failure_is_a_conflict_safe_to_run_again() -> None:
    for exc in (pgerrors.DeadlockDetected("deadlock detected"),
                pgerrors.SerializationFailure("could not serialize access")):
        translated = errors.translate(exc)
        assert isinstance(translated, errors.Conflict)
        # Still "unavailable" to anything that only knows to retry that (router flushes).
        assert isinstance(translated, errors.DatabaseUnavailable)


@pytest.mark.parametrize(
    ("server_says", "refused"),
    [
        ('FATAL:  database "nope" does not exist', True),
        ('FATAL:  password authentication failed for user "relayq"', True),
        ('FATAL:  role "nobody" does not exist', True),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "relayq"', True),
        ("FATAL:  the database system is starting up", False),
        ("FATAL:  the database system is shutting down", False),
        ("FATAL:  the database system is in recovery mode", False),
        ("FATAL:  sorry, too many clients already", False),
        ("Connection refused\n\tIs the server running on that host and accepting TCP/IP"
         " connections?", False),
    ])
def test_a_connection_postgres_refuses_for_good_is_not_retried(
        server_says: str, refused: bool) -> None:
    exc = psycopg.OperationalError(
        f'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        f"{server_says}")
    translated = errors.translate(exc)
    if refused:
        assert isinstance(translated, errors.DatabaseRefused)
        assert str(translated) == ("Postgres refused the connection: "
                                   + server_says.removeprefix("FATAL:").strip())
    else:
        assert isinstance(translated, errors.DatabaseUnavailable)


async def test_destinations_load_again_only_when_something_they_hold_changed(
        database: str, conn: AsyncConnection[Any]) -> None:
    """The router's reload: a digest of what load_all reads says whether to make the rows
    again; any change is seen, one undone later included, and a signing secret expiring."""
    versions: list[int] = []

    async def reload(last: str | None) -> destinations.Loaded | None:
        async with await psycopg.AsyncConnection.connect(database) as reader, \
                reader.transaction():
            version, loaded = await destinations.load_if_changed(reader, last)
        versions.append(version)
        return loaded

    first = await reload(None)
    assert first is not None
    assert first[1] == {}
    assert await reload(first[0]) is None

    tenant = await factories.tenant(conn)
    key = await factories.destination(conn, tenant, "hook")
    await conn.execute("INSERT INTO destination_secrets (destination_key, secret)"
                       " VALUES (%s, 'whsec_AAAA')", (key,))
    created = await reload(first[0])
    assert created is not None
    digest, rows, _ = created
    assert [s.secret for s in rows[key].signing_secrets] == ["whsec_AAAA"]
    assert await reload(digest) is None

    await conn.execute("UPDATE destinations SET paused = true WHERE destination_key = %s", (key,))
    paused = await reload(digest)
    assert paused is not None
    assert paused[1][key].paused
    await conn.execute("UPDATE destinations SET paused = false WHERE destination_key = %s", (key,))
    resumed = await reload(paused[0])
    assert resumed is not None
    assert not resumed[1][key].paused
    assert resumed[0] == digest  # the same rows as before: the same digest

    await conn.execute("UPDATE destination_secrets SET expires_at = now() - interval '1 second'"
                       " WHERE destination_key = %s", (key,))
    expired = await reload(digest)
    assert expired is not None
    assert expired[1][key].signing_secrets == ()

    # Routers fan events out along connections when they read the log: a connection made,
    # its filter changed or the connection disabled is a change to load too.
    source = await factories.source(conn, tenant)
    await factories.connect(conn, source.key, key)
    connected = await reload(expired[0])
    assert connected is not None
    assert connected.connections == [destinations.Connection(source.key, key, 1, None)]
    await conn.execute("UPDATE connections SET event_filter = %s", ("type = 'track'",))
    filtered = await reload(connected.digest)
    assert filtered is not None
    assert filtered.connections == [destinations.Connection(source.key, key, 1, "type = 'track'")]
    await conn.execute("UPDATE connections SET enabled = false")
    disabled = await reload(filtered.digest)
    assert disabled is not None
    assert disabled.connections == []
    # And each of those three moved the connections' version, which reads of the log check.
    assert versions[-4] < versions[-3] < versions[-2] < versions[-1]
