"""The overview: every destination the caller may see, with its live figures."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from admin_service.console import overview
from admin_service.console.web import console, render, session


async def page(request: web.Request) -> web.Response:
    return render(request, "overview.html", **await _table(request))


async def rows(request: web.Request) -> web.Response:
    """The table's body alone, which the page reloads every few seconds (htmx)."""
    return render(request, "overview_rows.html", **await _table(request))


async def _table(request: web.Request) -> dict[str, Any]:
    view = overview.View.parse(request.query)
    snapshot = await console(request).stats.snapshot(session(request).caller)
    table = overview.table(snapshot, view)

    def link(**changes: object) -> str:
        wanted = {"q": table.view.search, "sort": table.view.sort,
                  "dir": "desc" if table.view.descending else "", "page": table.view.page,
                  **changes}
        return "?" + urlencode({k: v for k, v in wanted.items() if v not in ("", None, 1)})

    def sort_link(column: str) -> str:
        flip = column == table.view.sort and not table.view.descending
        return link(sort=column, dir="desc" if flip else "", page=1)

    return {"table": table, "link": link, "sort_link": sort_link,
            "columns": list(overview.SORTS)}
