"""Router membership against a real Postgres: leases, fencing, and waking lanes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

from psycopg_pool import AsyncConnectionPool

from jobsdb import leases
from jobsdb.pool import open_pool
from router_service.membership import Membership
from tests.poll import eventually
from tests.services import router

Changes = list[tuple[set[int], set[int]]]


@contextlib.asynccontextmanager
async def _membership(database: str
                      ) -> AsyncIterator[tuple[Membership, Changes, AsyncConnectionPool]]:
    """Router r1's membership on a pool of its own, with the (gained, lost) it announces."""
    changes: Changes = []
    pool = await open_pool(database, application_name="test", min_size=1, max_size=2)
    try:
        yield Membership(pool, "r1", timedelta(seconds=30),
                         on_change=lambda g, lost: changes.append((g, lost)),
                         busy=lambda _: False), changes, pool
    finally:
        await pool.close()


async def test_a_router_fenced_by_a_late_heartbeat_wakes_its_lanes_when_usable_again(
        database: str) -> None:
    """Lanes skip their work while the router's leases may have lapsed; when a later heartbeat
    renews the same partitions nothing is gained or lost, yet the lanes must look again (a
    retry that came due meanwhile would otherwise wait for the next change)."""
    async with _membership(database) as (membership, changes, _):
        await membership.beat()
        assert len(changes[0][0]) == 64
        assert membership.usable() == frozenset(range(64))
        await membership.beat()
        assert len(changes) == 1  # renewed, nothing to tell
        membership._valid_until = 0.0  # the heartbeat ran late: fenced
        assert membership.usable() == frozenset()
        await membership.beat()
        assert changes[1:] == [(set(), set())]
        assert membership.usable() == frozenset(range(64))


async def test_heartbeats_keep_the_lease_while_every_pooled_connection_is_busy(
        database: str) -> None:
    """Busy lanes can take every connection of the router's pool; its heartbeats have their
    own, so the lease (and with it the right to record outcomes) is not lost meanwhile."""
    async with router(database, RELAYQ_ROUTER_LEASE_SECONDS="2",
                      RELAYQ_ROUTER_POOL_SIZE="3") as relay:
        engine = relay.app.engine
        assert engine is not None
        owned = await eventually(engine.membership.usable, within=5, what="partitions owned")
        assert owned
        taken = [await engine.pool.getconn() for _ in range(3)]
        try:
            await asyncio.sleep(3.0)  # more than a lease
            assert engine.membership.usable() == owned
        finally:
            for conn in taken:
                await engine.pool.putconn(conn)


async def test_a_lease_that_ran_out_untaken_is_renewed_and_a_taken_one_is_lost(
        database: str) -> None:
    """Postgres unreachable for longer than the lease: the router's leases ran out. Those
    nobody took are still its own (its writes are fenced by owner), so the next heartbeat
    renews them and the router keeps them, and what it knows of them, without reading them
    over again; only the one another router took is lost."""
    async with _membership(database) as (membership, changes, pool):
        await membership.beat()
        assert membership.owned == set(range(64))
        async with pool.connection() as conn:
            await conn.execute("UPDATE router_leases SET expires_at = now() - interval '1s'")
            assert await leases.acquire(conn, "r2", timedelta(seconds=30), 1) == {0}
        membership._valid_until = 0.0  # its heartbeats failed meanwhile: fenced
        await membership.beat()
        assert changes[1:] == [(set(), {0})]
        assert membership.owned == set(range(1, 64))
        assert membership.usable() == frozenset(range(1, 64))
