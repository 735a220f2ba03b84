"""Secrets sealed at rest (jobsdb.sealing): the database holds no signing secret, header value
or endpoint credential in clear, rows stored before sealing are sealed at start, a wrong or
missing key stops a process at start, and a key rotation re-seals without a delivery failing
or one going out unsigned."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection

from jobsdb import sealing
from relayq.v1 import admin_pb2
from tests import factories
from tests.helpers import TEST_SECRET_KEY, event, verifies
from tests.pipeline import World, send, states, wait_until_finished
from tests.poll import eventually
from tests.services import Admin, admin, finish, ingest, launch, quiet_env, router

HEADER_VALUE = "Bearer hdr-value-0d1e2f3a4b5c"
NATS_PASSWORD = "n4ts-pw-7f6e5d4c3b2a"
PG_DUMP = (shutil.which("pg_dump", path="/usr/lib/postgresql/15/bin")
           or shutil.which("pg_dump") or "pg_dump")


def pg_dump(dsn: str) -> str:
    return subprocess.run([PG_DUMP, "--dbname", dsn], check=True, capture_output=True,
                          text=True, timeout=60).stdout


async def _configure(service: Admin, world: World) -> str:
    """A tenant's webhook (signed, with a credential header), gRPC and NATS destinations (with
    credentials in the endpoint), connected to the world's source. Returns the signing
    secret."""
    created = await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="hook", tenant_id="acme", type="webhook", endpoint=world.webhook.url,
        headers={"Authorization": HEADER_VALUE}), metadata=Admin.auth())
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="grpc-sink", tenant_id="acme", type="grpc", endpoint=world.grpc_sink.endpoint,
        headers={"authorization": HEADER_VALUE + "-grpc"}, paused=True),
        metadata=Admin.auth())
    await service.stub.CreateDestination(admin_pb2.CreateDestinationRequest(
        id="bus", tenant_id="acme", type="nats", paused=True,
        endpoint=f"nats://relayq:{NATS_PASSWORD}@127.0.0.1:4222/events.{{user_id}}"),
        metadata=Admin.auth())
    await service.stub.ConnectSource(admin_pb2.ConnectSourceRequest(
        source_id="web", destination_id="hook"), metadata=Admin.auth())
    return created.signing_secret


async def test_the_database_holds_no_secret_header_or_credential_in_clear(world: World
                                                                         ) -> None:
    async with admin(world.database) as service:
        secret = await _configure(service, world)
        got = await service.stub.GetDestination(admin_pb2.GetDestinationRequest(id="bus"),
                                                metadata=Admin.auth())
        # The tenant and operator still read what they wrote (admin opens it).
        assert NATS_PASSWORD in got.endpoint
        async with ingest(world.database) as service_in, router(world.database):
            await send(service_in, world.source, [event("m1")])
            await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1)
    [delivery] = world.webhook.oks
    assert delivery.headers["Authorization"] == HEADER_VALUE
    assert verifies(secret, delivery)
    dump = pg_dump(world.database)
    assert "CREATE TABLE public.destination_secrets" in dump  # a dump of the real thing
    raw_secret = secret.removeprefix("whsec_")
    for clear in (secret, raw_secret, base64.b64decode(raw_secret).hex(), HEADER_VALUE,
                  "hdr-value-0d1e2f3a4b5c", NATS_PASSWORD):
        assert clear not in dump, clear
    # What stays readable: where the NATS destination goes, without its credentials.
    assert "nats://127.0.0.1:4222/events.{user_id}" in dump


async def test_rows_stored_in_clear_are_sealed_at_start_and_still_sign(world: World) -> None:
    """Rows written before sealing existed: the first admin or router with the keys seals
    them, and deliveries are signed with the secret they had all along."""
    key = await factories.destination(world.conn, world.tenant, "old", endpoint=world.webhook.url,
                                      headers='{"Authorization": "' + HEADER_VALUE + '"}')
    await factories.connect(world.conn, world.source.key, key)
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    await world.conn.execute("INSERT INTO destination_secrets (destination_key, secret)"
                             " VALUES (%s, %s)", (key, secret))
    async with admin(world.database):
        pass
    cur = await world.conn.execute(
        "SELECT s.secret, s.sealed IS NOT NULL, d.headers::text, d.sealed_headers IS NOT NULL"
        " FROM destination_secrets s JOIN destinations d USING (destination_key)")
    assert await cur.fetchall() == [(None, True, "{}", True)]
    async with ingest(world.database) as service, router(world.database):
        await send(service, world.source, [event("m1")])
        await world.webhook.wait_for(lambda: len(world.webhook.oks) == 1)
    assert verifies(secret, world.webhook.oks[0])
    assert world.webhook.oks[0].headers["Authorization"] == HEADER_VALUE


async def test_a_wrong_or_missing_key_stops_the_router_and_admin_at_start(world: World
                                                                         ) -> None:
    async with admin(world.database) as service:
        await _configure(service, world)
    wrong = sealing.new_key()
    for module in ("router_service.main", "admin_service.main"):
        stopped = launch(module, quiet_env(world.database, RELAYQ_SECRET_KEYS=wrong))
        _, stderr = finish(stopped, 60)
        assert stopped.returncode == 1, stderr
        line = stderr.strip().splitlines()[-1]
        assert line.startswith(f"relayq-{module.split('_')[0]}: RELAYQ_SECRET_KEYS"), line
        assert "a wrong or missing key" in line, line
        unset = launch(module, quiet_env(world.database, RELAYQ_SECRET_KEYS=""))
        _, stderr = finish(unset, 60)
        assert unset.returncode == 2, stderr
        assert "RELAYQ_SECRET_KEYS: not set" in stderr.strip().splitlines()[-1]
    # Nothing was delivered, and nothing changed in the database.
    assert world.webhook.received == []


async def test_a_key_rotation_reseals_without_a_delivery_failing_and_all_signed(
        world: World, conn: AsyncConnection[Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    old, new = TEST_SECRET_KEY, sealing.new_key()
    sent: list[int] = []
    stop = asyncio.Event()

    async def traffic(service: Any) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent.extend(await send(service, world.source, [event(f"m{n}", f"u{n % 3}")]))
            await asyncio.sleep(0.02)

    async with admin(world.database) as service:
        secret = await _configure(service, world)
    async with ingest(world.database) as service:
        sending = asyncio.create_task(traffic(service))
        try:
            # 1. Routers run with the old key alone; then are restarted with both keys.
            async with router(world.database, RELAYQ_SECRET_KEYS=old):
                await eventually(lambda: len(world.webhook.oks) >= 5)
            async with router(world.database, RELAYQ_SECRET_KEYS=f"{new},{old}"):
                # 2. Re-seal under the new key, while deliveries go on.
                monkeypatch.setenv("RELAYQ_DATABASE_URL", world.database)
                monkeypatch.setenv("RELAYQ_SECRET_KEYS", f"{new},{old}")
                from relayq.cli import secrets
                await asyncio.to_thread(secrets.run_rekey, type("A", (), {"wait": 10})())
                assert "under key" in capsys.readouterr().out
                count = len(world.webhook.oks)
                await eventually(lambda: len(world.webhook.oks) >= count + 5)
            # 3. The old key dropped.
            async with router(world.database, RELAYQ_SECRET_KEYS=new):
                count = len(world.webhook.oks)
                await eventually(lambda: len(world.webhook.oks) >= count + 5)
                stop.set()
                await sending
                await wait_until_finished(conn, len(sent))
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await sending
    final = await states(conn)
    assert set(final.values()) == {"succeeded"}
    # No attempt failed, every request was signed by the destination's secret.
    cur = await conn.execute("SELECT count(*) FROM job_statuses WHERE state <> 'succeeded'")
    assert (await cur.fetchone() or [None])[0] == 0
    assert world.webhook.received
    assert all(verifies(secret, delivery) for delivery in world.webhook.received)
    assert await sealing.key_ids_in_use(conn) == {sealing.key_id(
        base64.urlsafe_b64decode(new)).hex()}


def test_keys_are_checked_at_start_and_never_shown(tmp_path: Path) -> None:
    from relayq.config import ConfigError, Env, secret_keys

    for value, problem in (("", "not set"), ("not base64!", "not base64"),
                           (base64.urlsafe_b64encode(b"short").decode(), "is 5 bytes")):
        with pytest.raises(ConfigError, match=problem) as raised:
            secret_keys(Env({"RELAYQ_SECRET_KEYS": value}))
        assert raised.value.variable == "RELAYQ_SECRET_KEYS"
    keyring = sealing.Keyring.parse(f"{sealing.new_key()},{TEST_SECRET_KEY}")
    older = sealing.Keyring.parse(TEST_SECRET_KEY)
    sealed = older.seal_text("whsec_x", sealing.SIGNING_SECRET)
    assert keyring.open_text(sealed, sealing.SIGNING_SECRET) == "whsec_x"  # all keys open
    assert not keyring.is_current(sealed)
    with pytest.raises(sealing.SealError):  # one kind of value is not another
        keyring.open_text(sealed, sealing.HEADERS)
    with pytest.raises(sealing.SealError, match="not among the keys"):
        sealing.Keyring.parse(sealing.new_key()).open_text(sealed, sealing.SIGNING_SECRET)
