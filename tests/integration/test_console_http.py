"""The console's HTTP rules without a browser: configuration, sessions over TLS, CSRF and
origin checks, headers, its own files, live fragments of an ended session."""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from admin_service.config import AdminConfig
from admin_service.main import AdminApp
from relayq.addresses import AddressUnusable
from relayq.config import ConfigError, Env
from relayq.ports import free_port
from tests.certs import needs_openssl, self_signed
from tests.services import OPERATOR_TOKEN, quiet_env


def test_the_console_is_off_unless_its_address_is_set(database: str) -> None:
    assert AdminConfig.from_env(Env(quiet_env(database))).console is None
    on = AdminConfig.from_env(Env(quiet_env(
        database, RELAYQ_ADMIN_CONSOLE_ADDRESS="127.0.0.1:0"))).console
    assert on is not None
    assert on.address == "127.0.0.1:0"
    with pytest.raises(ConfigError, match="RELAYQ_ADMIN_CONSOLE_ADDRESS"):
        AdminConfig.from_env(Env(quiet_env(database, RELAYQ_ADMIN_CONSOLE_ADDRESS="8080")))


async def test_a_taken_console_port_stops_the_admin_naming_the_variable(database: str) -> None:
    port = free_port()
    env = Env(quiet_env(database, RELAYQ_ADMIN_CONSOLE_ADDRESS=f"127.0.0.1:{port}"))
    first = await AdminApp.start(AdminConfig.from_env(env))
    try:
        with pytest.raises(AddressUnusable,
                           match=f"RELAYQ_ADMIN_CONSOLE_ADDRESS=127.0.0.1:{port}"):
            await AdminApp.start(AdminConfig.from_env(env))
    finally:
        await first.stop()


@pytest.fixture
async def console(database: str, tmp_path: Path) -> AsyncIterator[str]:
    app = await AdminApp.start(AdminConfig.from_env(Env(quiet_env(
        database, RELAYQ_ADMIN_CONSOLE_ADDRESS="127.0.0.1:0"))))
    assert app.console is not None
    try:
        yield app.console.url.rstrip("/")
    finally:
        await app.stop()


async def _signed_in(session: aiohttp.ClientSession, base: str) -> str:
    """Sign in as the operator; the session's CSRF token."""
    async with session.get(f"{base}/sign-in") as page:
        csrf = _csrf(await page.text())
    async with session.post(f"{base}/sign-in", data={"csrf": csrf, "token": OPERATOR_TOKEN},
                            allow_redirects=False) as answer:
        assert answer.status == 303
    async with session.get(f"{base}/destinations") as page:
        return _csrf(await page.text())


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


async def test_forms_need_the_sessions_token_and_the_consoles_origin(console: str) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        csrf = await _signed_in(session, console)
        tenant = {"id": "acme", "name": "Acme"}
        async with session.post(f"{console}/tenants", data=tenant,
                                allow_redirects=False) as answer:
            assert answer.status == 403  # no token
        async with session.post(f"{console}/tenants", data={**tenant, "csrf": "forged"},
                                allow_redirects=False) as answer:
            assert answer.status == 403
        async with session.post(f"{console}/tenants", data={**tenant, "csrf": csrf},
                                headers={"Origin": "https://elsewhere.example"},
                                allow_redirects=False) as answer:
            assert answer.status == 403  # the right token, from another site's page
        async with session.post(f"{console}/tenants", data={**tenant, "csrf": csrf},
                                headers={"Origin": console}, allow_redirects=False) as answer:
            assert answer.status == 303
        async with session.get(f"{console}/tenants") as page:
            assert "Acme" in await page.text()


async def test_sign_in_needs_its_forms_own_token(console: str) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session, \
            session.post(f"{console}/sign-in", data={"token": OPERATOR_TOKEN},
                         allow_redirects=False) as answer:
        assert answer.status == 403
        assert "relayq_session" not in answer.cookies


async def test_pages_headers_and_the_consoles_own_files(console: str) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        await _signed_in(session, console)
        async with session.get(f"{console}/") as page:
            text = await page.text()
            assert page.headers["Cache-Control"] == "no-store"
            assert "default-src 'self'" in page.headers["Content-Security-Policy"]
            assert page.headers["X-Frame-Options"] == "DENY"
        script = re.search(r'src="(/static/[0-9a-f]+/htmx-2\.0\.11\.min\.js)"', text)
        assert script is not None
        async with session.get(console + script.group(1)) as answer:
            assert answer.status == 200
            assert answer.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert (await answer.read()).startswith(b"var htmx=")
        async with session.get(f"{console}/static/000000000000/htmx-2.0.11.min.js") as answer:
            assert answer.status == 404


async def test_a_live_fragment_of_an_ended_session_sends_the_page_to_sign_in(
        console: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(
            f"{console}/overview/rows", headers={"HX-Request": "true"},
            allow_redirects=False) as answer:
        assert answer.status == 204
        assert answer.headers["HX-Redirect"] == "/sign-in"


@needs_openssl
async def test_under_tls_the_console_serves_https_and_its_cookie_is_secure(
        database: str, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    app = await AdminApp.start(AdminConfig.from_env(Env(quiet_env(
        database, RELAYQ_ADMIN_CONSOLE_ADDRESS="127.0.0.1:0",
        RELAYQ_TLS_CERT_FILE=str(cert), RELAYQ_TLS_KEY_FILE=str(key)))))
    try:
        assert app.console is not None
        assert app.console.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        connector = aiohttp.TCPConnector(ssl=trust)
        async with aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            base = app.console.url.rstrip("/")
            async with session.get(f"{base}/sign-in") as page:
                csrf = _csrf(await page.text())
            async with session.post(f"{base}/sign-in",
                                    data={"csrf": csrf, "token": OPERATOR_TOKEN},
                                    allow_redirects=False) as answer:
                cookie = answer.cookies["relayq_session"]
                assert cookie["secure"]
                assert cookie["httponly"]
                assert cookie["samesite"] == "Strict"
    finally:
        await app.stop()
