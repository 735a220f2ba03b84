"""Events: a source's events by the filter language, an event found by its message id, and
an event's page with where it stands at each destination of its source."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from google.protobuf import json_format

from admin_service.console.jobs_pages import bad_filter, state_name
from admin_service.console.web import console, render, see_other, session
from admin_service.ops.jobs import BadFilter
from relayq.v1 import admin_pb2

PAGE = 50


def status_name(status: admin_pb2.EventStatus.ValueType) -> str:
    return admin_pb2.EventStatus.Name(status).removeprefix("EVENT_STATUS_").lower()


async def browse(request: web.Request) -> web.Response:
    source = request.query.get("source", "").strip()
    text = request.query.get("filter", "")
    token = request.query.get("page_token", "")
    page: dict[str, Any] = {"source": source, "filter": text, "events": [], "next_link": "",
                            "bad": None, "encode": urlencode}
    if not source:
        return render(request, "events.html", **page)
    try:
        found = await console(request).ops.events.list(
            session(request).caller, admin_pb2.ListEventsRequest(
                source_id=source, filter=text, page_size=PAGE, page_token=token))
    except BadFilter as exc:
        return render(request, "events.html", status=400, **{**page,
                                                              "bad": bad_filter(text, exc)})
    next_link = ("?" + urlencode({"source": source, "filter": text,
                                  "page_token": found.next_page_token})
                 if found.next_page_token else "")
    return render(request, "events.html", **{**page, "events": found.events,
                                             "next_link": next_link})


async def find(request: web.Request) -> web.Response:
    """An event by (source, message id): its page."""
    found = await console(request).ops.events.get(
        session(request).caller, admin_pb2.GetEventRequest(
            source_id=request.query.get("source", "").strip(),
            message_id=request.query.get("message_id", "")))
    raise see_other(f"/events/{found.event.event_id}")


async def event(request: web.Request) -> web.Response:
    text = request.match_info["event_id"]
    if not text.isdigit() or not 0 < int(text) < 2**63:
        raise web.HTTPNotFound()
    found = await console(request).ops.events.get(
        session(request).caller, admin_pb2.GetEventRequest(event_id=int(text)))
    payload = (json.dumps(json_format.MessageToDict(found.event.payload), indent=2,
                          sort_keys=True) if found.event.HasField("payload") else "")
    return render(request, "event.html", event=found.event, destinations=found.destinations,
                  payload=payload, status_name=status_name, state_name=state_name)
