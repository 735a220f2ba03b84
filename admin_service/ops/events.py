"""Events of the log: list a source's by filter, get one (by id or by message id) with where
it stands at each destination of its source. Read-only; tenant-scoped like every read (an
event or source of another tenant is NOT_FOUND, never shown)."""

from __future__ import annotations

from admin_service import convert, paging, validate
from admin_service.ops.base import Concern
from admin_service.ops.jobs import BadFilter
from filterlang.errors import FilterError
from jobsdb import catalog
from jobsdb import events as eventsdb
from jobsdb.filters import Compiled, compile_event_list_filter
from jobsdb.pool import transaction
from relayq.auth import Caller
from relayq.client.limits import MAX_MESSAGE_ID
from relayq.v1 import admin_pb2


def event_filter(text: str) -> Compiled | None:
    """An operator's filter over events; a malformed one is INVALID_ARGUMENT naming the
    position and what was expected."""
    try:
        return compile_event_list_filter(text)
    except FilterError as exc:
        raise BadFilter(exc) from None


class Events(Concern):
    async def list(self, caller: Caller, request: admin_pb2.ListEventsRequest
                   ) -> admin_pb2.ListEventsResponse:
        source_id = validate.reference("source_id", request.source_id)
        page = paging.read("events", request.page_size, request.page_token)
        after = page.after_id
        chosen = event_filter(request.filter)
        async with transaction(self._pool) as conn:
            source = await catalog.get_source(conn, source_id, caller.scope)
            found = await eventsdb.list_events(conn, source.source_key, chosen, after=after,
                                               limit=page.limit,
                                               include_payload=request.include_payload)
        more = found.more_after
        return admin_pb2.ListEventsResponse(
            events=[convert.logged_event(r) for r in found.rows],
            next_page_token=paging.token("events", str(more)) if more is not None else "")

    async def get(self, caller: Caller, request: admin_pb2.GetEventRequest
                  ) -> admin_pb2.GetEventResponse:
        by_message = bool(request.source_id or request.message_id)
        if request.event_id and by_message:
            raise validate.bad("event_id", "give event_id, or source_id and message_id, not both")
        if request.event_id < 0 or (not request.event_id and not by_message):
            raise validate.bad("event_id", "required (a positive event id), or source_id and "
                                           "message_id")
        if by_message:
            source_id = validate.reference("source_id", request.source_id)
            if not request.message_id:
                raise validate.bad("message_id", "required with source_id")
            if len(request.message_id) > MAX_MESSAGE_ID or "\x00" in request.message_id:
                raise validate.bad("message_id", f"at most {MAX_MESSAGE_ID} characters, no NUL")
        async with transaction(self._pool) as conn:
            if by_message:
                source = await catalog.get_source(conn, source_id, caller.scope)
                event = await eventsdb.get_by_message(conn, source.source_key,
                                                      request.message_id, caller.scope)
            else:
                event = await eventsdb.get_by_id(conn, request.event_id, caller.scope)
            standing = await eventsdb.destinations(conn, event, caller.scope)
        return admin_pb2.GetEventResponse(
            event=convert.logged_event(event),
            destinations=[convert.at_destination(s) for s in standing])
