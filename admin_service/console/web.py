"""What every console page shares: rendering, the session and CSRF checks, security headers,
and errors of the service layer turned into pages."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web
from google.protobuf import timestamp_pb2

from admin_service.console.errors import http_status
from admin_service.console.overview import StatsCache
from admin_service.console.sessions import COOKIE, Session, Sessions
from admin_service.console.static import StaticFiles
from admin_service.ops import Operations
from jobsdb.errors import JobsDBError
from relayq.rpc import ServiceError

log = logging.getLogger("relayq.admin.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Pages anyone may load: the sign-in form and the console's own files.
PUBLIC = ("/sign-in", "/static/")
# Pages never leave the browser's cache or history with their figures or secrets; scripts,
# styles, forms and fetches go only to this origin, and no other site may frame the console.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self';"
                               " img-src 'self' data:; form-action 'self';"
                               " frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@dataclass
class Console:
    """The console's collaborators, one per application."""

    ops: Operations
    sessions: Sessions
    stats: StatsCache
    static: StaticFiles
    templates: jinja2.Environment
    secure: bool


CONSOLE = web.AppKey("console", Console)
# The signed-in session of a request (every page but the public ones has one).
SESSION = web.RequestKey("session", Session)
# The sign-in form's own CSRF token, for the page that shows the form.
SIGNIN_CSRF = web.RequestKey("signin_csrf", str)


def console(request: web.Request) -> Console:
    return request.app[CONSOLE]


def session(request: web.Request) -> Session:
    return request[SESSION]


def render(request: web.Request, template: str, *, status: int = 200,
           **context: Any) -> web.Response:
    parts = console(request)
    current = request.get(SESSION)
    text = parts.templates.get_template(template).render(
        session=current, caller=current.caller if current else None,
        csrf=current.csrf if current else request.get(SIGNIN_CSRF, ""),
        static=parts.static.url, path=request.path, **context)
    return web.Response(text=text, status=status, content_type="text/html")


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("admin_service.console", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True)
    env.filters["when"] = when
    env.filters["age"] = age
    env.filters["rate"] = lambda value: f"{value:.2f}" if value else "0"
    return env


def when(stamp: timestamp_pb2.Timestamp | None) -> str:
    """A protobuf time as UTC to the millisecond; '' when unset."""
    if stamp is None or (stamp.seconds == 0 and stamp.nanos == 0):
        return ""
    moment = datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def age(seconds: float) -> str:
    if not seconds:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.update(HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@web.middleware
async def signed_in(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every page but the public ones needs a live session; every POST its CSRF token."""
    if request.path.startswith(PUBLIC):
        return await handler(request)
    cookie = request.cookies.get(COOKIE, "")
    found = await console(request).sessions.find(cookie) if cookie else None
    if found is None:
        return _to_sign_in(request)
    request[SESSION] = found
    if request.method == "POST":
        form = await request.post()
        given = str(form.get("csrf", "")) or request.headers.get("X-CSRF-Token", "")
        if not found.csrf_matches(given) or not same_origin(request):
            return render(request, "error.html", status=403,
                          message="this form is not from this console session (reload the"
                                  " page and try again)")
    return await handler(request)


@web.middleware
async def service_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An operation's error a page did not show itself becomes a page saying it."""
    try:
        return await handler(request)
    except (ServiceError, JobsDBError) as exc:
        status, message = http_status(exc)
        if status >= 500:
            log.warning("console %s %s failed: %s", request.method, request.path, exc)
        if status == 401:
            return _to_sign_in(request)
        return render(request, "error.html", status=status, message=message)


def same_origin(request: web.Request) -> bool:
    """A browser names the page a form came from; it must be one of ours. (SameSite=Strict
    already keeps the cookie off other sites' requests; this holds even without it.)"""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return origin == f"{request.scheme}://{request.host}"


def _to_sign_in(request: web.Request) -> web.StreamResponse:
    if request.headers.get("HX-Request"):
        # A live fragment of a page whose session ended: htmx loads the sign-in page whole.
        return web.Response(status=204, headers={"HX-Redirect": "/sign-in"})
    raise web.HTTPSeeOther("/sign-in")


def see_other(location: str) -> web.HTTPSeeOther:
    """After a form: the page to show, loaded by GET (so a reload repeats nothing)."""
    return web.HTTPSeeOther(location)
