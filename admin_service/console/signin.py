"""Signing in with an admin token (the operator's or a tenant's) and out again."""

from __future__ import annotations

import hmac
import secrets

from aiohttp import web

from admin_service.console.sessions import COOKIE
from admin_service.console.web import SIGNIN_CSRF, console, render, same_origin, see_other
from relayq.rpc import Unauthenticated

# The sign-in form's own CSRF token: a cookie the form must echo (double submit), so no
# other site can sign a browser in to a session of its choosing.
SIGNIN_COOKIE = "relayq_signin"


async def form(request: web.Request) -> web.Response:
    token = request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(24)
    request[SIGNIN_CSRF] = token
    response = render(request, "sign_in.html", error="")
    _set_cookie(request, response, SIGNIN_COOKIE, token, max_age=3600)
    return response


async def sign_in(request: web.Request) -> web.StreamResponse:
    posted = await request.post()
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    given = str(posted.get("csrf", ""))
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()) \
            or not same_origin(request):
        return await _again(request, "the sign-in form expired; try again", 403)
    token = str(posted.get("token", "")).strip()
    if not token:
        return await _again(request, "give an admin token", 400)
    try:
        started = await console(request).sessions.sign_in(token)
    except Unauthenticated:
        return await _again(request, "unknown or revoked admin token", 401)
    response = see_other("/")
    _set_cookie(request, response, COOKIE, started.id,
                max_age=console(request).sessions.lifetime_seconds)
    response.del_cookie(SIGNIN_COOKIE, path="/")
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    await console(request).sessions.sign_out(request.cookies.get(COOKIE, ""))
    response = see_other("/sign-in")
    response.del_cookie(COOKIE, path="/")
    raise response


async def _again(request: web.Request, error: str, status: int) -> web.Response:
    token = secrets.token_urlsafe(24)
    request[SIGNIN_CSRF] = token
    response = render(request, "sign_in.html", status=status, error=error)
    _set_cookie(request, response, SIGNIN_COOKIE, token, max_age=3600)
    return response


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str,
                *, max_age: int) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site's request carries it),
    Secure when the console serves TLS."""
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                        samesite="Strict", secure=console(request).secure)
