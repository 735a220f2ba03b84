"""NATS JetStream for tests: the server at 127.0.0.1:4222 (RELAYQ_TEST_NATS_URL), a stream of a
test's own (deleted after), and a NATS destination connected to the test world's source."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamConfig

from tests import factories
from tests.pipeline import FAST_RETRIES, World
from tests.poll import eventually

NATS_URL = os.environ.get("RELAYQ_TEST_NATS_URL", "nats://127.0.0.1:4222")


@dataclass
class Stream:
    name: str
    # Every subject of the stream starts with `prefix.`
    prefix: str
    js: JetStreamContext

    async def count(self) -> int:
        return (await self.js.stream_info(self.name)).state.messages

    async def messages(self) -> list[RawStreamMsg]:
        """Everything stored, in stream order."""
        state = (await self.js.stream_info(self.name)).state
        if not state.messages:
            return []
        return [await self.js.get_msg(self.name, seq)
                for seq in range(state.first_seq, state.last_seq + 1)]

    async def wait_for(self, count: int, within: float = 30.0) -> None:
        async def enough() -> bool:
            return await self.count() >= count

        async def described() -> str:
            return f"{count} messages in stream {self.name} (it has {await self.count()})"

        await eventually(enough, within=within, every=0.05, what=described)


def unique_names() -> tuple[str, str]:
    """(stream name, subject prefix): other sessions share the server."""
    suffix = f"{os.getpid()}_{secrets.token_hex(4)}"
    return f"RELAYQ_TEST_{suffix}", f"rqtest{suffix}"


@contextlib.asynccontextmanager
async def connected(url: str = NATS_URL) -> AsyncIterator[Client]:
    try:
        client = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    except Exception as exc:
        pytest.fail(f"no NATS server with JetStream at {url} ({exc}); the tests need one")
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def made_stream(client: Client, **config: Any) -> AsyncIterator[Stream]:
    name, prefix = unique_names()
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"], **config))
    try:
        yield Stream(name, prefix, js)
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)


async def nats_destination(world: World, destination_id: str, endpoint: str,
                           **columns: Any) -> int:
    key = await factories.destination(world.conn, world.tenant, destination_id, kind="nats",
                                      endpoint=endpoint, **{**FAST_RETRIES, **columns})
    await factories.connect(world.conn, world.source.key, key)
    return key
