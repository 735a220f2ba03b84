"""Starting and stopping the console's HTTP server (aiohttp), beside relayq-admin's gRPC one."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from aiohttp import web
from psycopg_pool import AsyncConnectionPool

from admin_service.config import CONSOLE_ADDRESS, ConsoleConfig
from admin_service.console import (
    catalog_pages,
    events_pages,
    jobs_pages,
    overview_pages,
    signin,
)
from admin_service.console.overview import StatsCache
from admin_service.console.sessions import Sessions
from admin_service.console.static import StaticFiles
from admin_service.console.web import (
    CONSOLE,
    Console,
    security_headers,
    service_errors,
    signed_in,
    templates,
)
from admin_service.ops import Operations
from relayq import addresses
from relayq.auth import Authenticator

log = logging.getLogger("relayq.admin.console")


def application(parts: Console) -> web.Application:
    app = web.Application(middlewares=[security_headers, signed_in, service_errors],
                          client_max_size=256 * 1024)
    app[CONSOLE] = parts
    app.router.add_get("/static/{digest}/{name}", parts.static.serve)
    app.router.add_get("/sign-in", signin.form)
    app.router.add_post("/sign-in", signin.sign_in)
    app.router.add_post("/sign-out", signin.sign_out)
    app.router.add_get("/", overview_pages.page)
    app.router.add_get("/overview/rows", overview_pages.rows)
    app.router.add_get("/jobs", jobs_pages.browse)
    app.router.add_get("/jobs/{action:retry|abort}", jobs_pages.confirm)
    app.router.add_post("/jobs/{action:retry|abort}", jobs_pages.apply)
    app.router.add_get("/jobs/{job_id}", jobs_pages.job)
    app.router.add_get("/jobs/{job_id}/live", jobs_pages.job_live)
    app.router.add_get("/events", events_pages.browse)
    app.router.add_get("/events/find", events_pages.find)
    app.router.add_get("/events/{event_id}", events_pages.event)
    app.router.add_get("/tenants", catalog_pages.tenants)
    app.router.add_post("/tenants", catalog_pages.create_tenant)
    app.router.add_get("/sources", catalog_pages.sources)
    app.router.add_post("/sources", catalog_pages.create_source)
    app.router.add_post("/sources/{source_id}/rotate-key", catalog_pages.rotate_write_key)
    app.router.add_get("/destinations", catalog_pages.destinations)
    app.router.add_post("/destinations", catalog_pages.create_destination)
    app.router.add_get("/destinations/{destination_id}", catalog_pages.destination)
    app.router.add_get("/destinations/{destination_id}/live", catalog_pages.destination_live)
    app.router.add_get("/destinations/{destination_id}/peek", jobs_pages.peek)
    app.router.add_post("/destinations/{destination_id}/{action}",
                        catalog_pages.destination_action)
    app.router.add_get("/connections", catalog_pages.connections)
    app.router.add_post("/connections/{action}", catalog_pages.connection_action)
    return app


@dataclass
class ConsoleServer:
    runner: web.AppRunner
    parts: Console
    port: int
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.parts.stats.close()


async def start(config: ConsoleConfig, ops: Operations, pool: AsyncConnectionPool,
                auth: Authenticator, operator_token: str) -> ConsoleServer:
    """Serve the console on its address; AddressUnusable (naming the variable) if it cannot."""
    parts = Console(ops=ops, sessions=Sessions(pool, auth, operator_token,
                                               config.session_seconds),
                    stats=StatsCache(ops, config.stats_seconds), static=StaticFiles(),
                    templates=templates(), secure=config.tls is not None)
    runner = web.AppRunner(application(parts), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = addresses.split(config.address)
    tls = None
    if config.tls is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise addresses.AddressUnusable(CONSOLE_ADDRESS, config.address,
                                        addresses.reason(exc)) from None
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    url = f"{'https' if tls else 'http'}://{shown}:{port}/"
    log.info("console serving at %s", url, extra={"console_url": url, "address": config.address})
    return ConsoleServer(runner, parts, port, url)
