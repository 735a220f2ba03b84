"""The console's event pages over HTTP: a source's events by filter, an event found by its
message id, its standing at each destination; a bad filter marked, an unknown source 404."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from admin_service.config import AdminConfig
from admin_service.main import AdminApp
from relayq.config import Env
from tests.helpers import event
from tests.pipeline import World, send
from tests.services import OPERATOR_TOKEN, ingest, quiet_env


@dataclass
class Console:
    url: str
    session: aiohttp.ClientSession


@pytest.fixture
async def console(world: World) -> AsyncIterator[Console]:
    """acme/web -> a paused `hook`, events m0..m2 of users u0 and u1 in the log, and the
    console signed in as the operator."""
    await world.destination("hook", paused=True)
    async with ingest(world.database) as service:
        await send(service, world.source, [event(f"m{i}", f"u{i % 2}", n=i) for i in range(3)])
    app = await AdminApp.start(AdminConfig.from_env(Env(quiet_env(
        world.database, RELAYQ_ADMIN_CONSOLE_ADDRESS="127.0.0.1:0"))))
    assert app.console is not None
    base = app.console.url.rstrip("/")
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(f"{base}/sign-in") as page:
                found = re.search(r'name="csrf" value="([^"]+)"', await page.text())
                assert found is not None
            async with session.post(f"{base}/sign-in", allow_redirects=False, data={
                    "csrf": found.group(1), "token": OPERATOR_TOKEN}) as answer:
                assert answer.status == 303
            yield Console(base, session)
    finally:
        await app.stop()


def _rows(page: str, table: str, attribute: str) -> list[str]:
    body = page.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    return re.findall(rf'data-{attribute}="([^"]+)"', body)


async def test_events_listed_by_filter_found_by_message_id_and_shown(console: Console) -> None:
    async with console.session.get(f"{console.url}/events", params={
            "source": "web", "filter": "user_id = 'u0'"}) as page:
        assert page.status == 200
        listed = await page.text()
    ids = _rows(listed, "events", "event")
    assert len(ids) == 2
    assert "m0" in listed
    assert "m2" in listed
    assert "m1" not in listed.split('id="events"', 1)[1]

    async with console.session.get(f"{console.url}/events/find", allow_redirects=False,
                                   params={"source": "web", "message_id": "m2"}) as answer:
        assert answer.status == 303
        assert answer.headers["Location"] == f"/events/{ids[1]}"
    async with console.session.get(f"{console.url}/events/{ids[1]}") as page:
        assert page.status == 200
        shown = await page.text()
    assert 'id="message-id">m2<' in shown
    assert _rows(shown, "destinations", "destination") == ["hook"]
    assert 'class="status pending"' in shown
    assert '&#34;n&#34;: 2' in shown  # the payload, escaped


async def test_bad_filters_and_unknown_names(console: Console) -> None:
    async with console.session.get(f"{console.url}/events", params={
            "source": "web", "filter": "user_id = "}) as page:
        assert page.status == 400
        assert 'id="filter-error"' in await page.text()
    async with console.session.get(f"{console.url}/events", params={"source": "nope"}) as page:
        assert page.status == 404
    async with console.session.get(f"{console.url}/events/find", params={
            "source": "web", "message_id": "nope"}) as page:
        assert page.status == 404
    async with console.session.get(f"{console.url}/events/123456789") as page:
        assert page.status == 404
    async with console.session.get(f"{console.url}/events/x") as page:
        assert page.status == 404
