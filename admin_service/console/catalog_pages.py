"""Tenants, sources (write key shown once), destinations (signing secret shown once, rotate,
pause, circuit) and connections with their filters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from admin_service.console.errors import http_status
from admin_service.console.web import console, render, see_other, session
from jobsdb.errors import JobsDBError
from relayq import destination_types
from relayq.auth import Caller
from relayq.rpc import ServiceError
from relayq.v1 import admin_pb2

PAGE = 50

Form = Mapping[str, Any]


async def _form(request: web.Request) -> dict[str, str]:
    return {k: str(v).strip() for k, v in (await request.post()).items() if k != "csrf"}


async def _or_again(request: web.Request, action: Awaitable[web.StreamResponse],
                    again: Callable[[web.Request, str, Form], Awaitable[web.Response]],
                    form: Form) -> web.StreamResponse:
    """Run a form's action; a request the service layer refuses (a bad field, a taken id)
    shows the same page again with the message and what was typed."""
    try:
        return await action
    except (ServiceError, JobsDBError) as exc:
        status, message = http_status(exc)
        if status not in (400, 403, 409):
            raise
        page = await again(request, message, form)
        page.set_status(status)
        return page


async def _listing(request: web.Request, kind: str, operation: Callable[[Caller, Any],
                                                                      Awaitable[Any]],
                   message: Callable[..., Any], error: str, form: Form | None,
                   **extra: Any) -> web.Response:
    """A page of a List call (`kind`: its repeated field and the template's name), with the
    form that adds one, showing `error` and what was typed when that form was refused."""
    found = await operation(session(request).caller, message(
        page_size=PAGE, page_token=request.query.get("page_token", "")))
    return render(request, f"{kind}.html", status=400 if error else 200,
                  next_token=found.next_page_token, error=error, form=form or {},
                  **{kind: getattr(found, kind)}, **extra)


# --- tenants ---------------------------------------------------------------------------------

async def tenants(request: web.Request, error: str = "", form: Form | None = None
                  ) -> web.Response:
    return await _listing(request, "tenants", console(request).ops.tenants.list,
                          admin_pb2.ListTenantsRequest, error, form)


async def create_tenant(request: web.Request) -> web.StreamResponse:
    form = await _form(request)

    async def create() -> web.StreamResponse:
        await console(request).ops.tenants.create(session(request).caller,
                                                  admin_pb2.CreateTenantRequest(
                                                      id=form.get("id", ""),
                                                      name=form.get("name", "")))
        raise see_other("/tenants")

    return await _or_again(request, create(), tenants, form)


# --- sources ---------------------------------------------------------------------------------

async def sources(request: web.Request, error: str = "", form: Form | None = None
                  ) -> web.Response:
    return await _listing(request, "sources", console(request).ops.sources.list,
                          admin_pb2.ListSourcesRequest, error, form)


async def create_source(request: web.Request) -> web.StreamResponse:
    form = await _form(request)

    async def create() -> web.StreamResponse:
        made = await console(request).ops.sources.create(
            session(request).caller, admin_pb2.CreateSourceRequest(
                id=form.get("id", ""), tenant_id=form.get("tenant_id", ""),
                name=form.get("name", "")))
        return _secret_once(request, f"source {made.source.id}", "write key", made.write_key,
                            "/sources")

    return await _or_again(request, create(), sources, form)


async def rotate_write_key(request: web.Request) -> web.StreamResponse:
    source_id = request.match_info["source_id"]
    made = await console(request).ops.sources.rotate_write_key(
        session(request).caller, admin_pb2.RotateWriteKeyRequest(source_id=source_id))
    return _secret_once(request, f"source {made.source.id}", "new write key (the old one"
                        " stops working now)", made.write_key, "/sources")


def _secret_once(request: web.Request, owner: str, what: str, secret: str, back: str
                 ) -> web.Response:
    """A secret relayq keeps only hashed or encrypted: this page is the one time it shows."""
    return render(request, "secret.html", owner=owner, what=what, secret=secret, back=back)


# --- destinations ----------------------------------------------------------------------------

async def destinations(request: web.Request, error: str = "", form: Form | None = None
                       ) -> web.Response:
    return await _listing(request, "destinations", console(request).ops.destinations.list,
                          admin_pb2.ListDestinationsRequest, error, form,
                          types=sorted(destination_types.TYPES))


async def create_destination(request: web.Request) -> web.StreamResponse:
    form = await _form(request)

    async def create() -> web.StreamResponse:
        made = await console(request).ops.destinations.create(
            session(request).caller, admin_pb2.CreateDestinationRequest(
                id=form.get("id", ""), tenant_id=form.get("tenant_id", ""),
                name=form.get("name", ""), type=form.get("type", ""),
                endpoint=form.get("endpoint", "")))
        console(request).stats.invalidate()
        if made.signing_secret:
            return _secret_once(request, f"destination {made.id}", "signing secret",
                                made.signing_secret, f"/destinations/{quote(made.id)}")
        raise see_other(f"/destinations/{quote(made.id)}")

    return await _or_again(request, create(), destinations, form)


async def destination(request: web.Request, error: str = "", form: Form | None = None
                      ) -> web.Response:
    destination_id = request.match_info["destination_id"]
    caller, ops = session(request).caller, console(request).ops
    found = await ops.destinations.get(caller, admin_pb2.GetDestinationRequest(
        id=destination_id))
    connections = await ops.connections.list(caller, admin_pb2.ListConnectionsRequest(
        destination_id=destination_id))
    return render(request, "destination.html", status=400 if error else 200, d=found,
                  connections=connections.connections, error=error,
                  jobs_filter=urlencode({"filter": f"destination = '{found.id}'"}),
                  **await _destination_stats(request, destination_id))


async def destination_live(request: web.Request) -> web.Response:
    destination_id = request.match_info["destination_id"]
    return render(request, "destination_live.html",
                  **await _destination_stats(request, destination_id))


async def _destination_stats(request: web.Request, destination_id: str) -> dict[str, Any]:
    stats = await console(request).ops.stats.get(
        session(request).caller, admin_pb2.GetStatsRequest(destination_id=destination_id))
    found = stats.destinations[0] if stats.destinations else None
    return {"stats": found, "destination_id": destination_id}


async def destination_action(request: web.Request) -> web.StreamResponse:
    """Pause, resume, open or close the circuit, rotate the signing secret."""
    destination_id = request.match_info["destination_id"]
    action = request.match_info["action"]
    form = await _form(request)
    caller, ops = session(request).caller, console(request).ops

    async def act() -> web.StreamResponse:
        if action in ("pause", "resume"):
            await ops.destinations.update(caller, admin_pb2.UpdateDestinationRequest(
                id=destination_id, paused=action == "pause"))
        elif action in ("open-circuit", "close-circuit"):
            await ops.destinations.set_circuit(caller, admin_pb2.SetCircuitRequest(
                destination_id=destination_id, open=action == "open-circuit",
                reason=form.get("reason", "")))
        elif action == "rotate-secret":
            rotated = await ops.destinations.rotate_signing_secret(
                caller, admin_pb2.RotateSigningSecretRequest(destination_id=destination_id))
            return _secret_once(request, f"destination {destination_id}",
                                "new signing secret (the old one signs too until"
                                f" {rotated.previous_expire_at.ToJsonString()})",
                                rotated.signing_secret,
                                f"/destinations/{quote(destination_id)}")
        else:
            raise web.HTTPNotFound()
        console(request).stats.invalidate()
        raise see_other(f"/destinations/{quote(destination_id)}")

    return await _or_again(request, act(), destination, form)


# --- connections -----------------------------------------------------------------------------

async def connections(request: web.Request, error: str = "", form: Form | None = None
                      ) -> web.Response:
    found = await console(request).ops.connections.list(session(request).caller,
                                                        admin_pb2.ListConnectionsRequest())
    return render(request, "connections.html", status=400 if error else 200,
                  connections=found.connections, error=error, form=form or {})


async def connection_action(request: web.Request) -> web.StreamResponse:
    """Connect, change a connection's filter, or disconnect."""
    action = request.match_info["action"]
    form = await _form(request)
    caller, ops = session(request).caller, console(request).ops
    pair = {"source_id": form.get("source_id", ""),
            "destination_id": form.get("destination_id", "")}

    async def act() -> web.StreamResponse:
        if action == "connect":
            await ops.connections.connect(caller, admin_pb2.ConnectSourceRequest(
                **pair, filter=form.get("filter", "")))
        elif action == "filter":
            await ops.connections.update(caller, admin_pb2.UpdateConnectionRequest(
                **pair, filter=form.get("filter", "")))
        elif action == "disconnect":
            await ops.connections.disconnect(caller, admin_pb2.DisconnectSourceRequest(**pair))
        else:
            raise web.HTTPNotFound()
        raise see_other("/connections")

    return await _or_again(request, act(), connections, form)
