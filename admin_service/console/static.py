"""The console's own files (htmx, its stylesheet), served under a digest of their content so
browsers may keep them for a year: a changed file is a new URL. Nothing is fetched from
elsewhere; the console works with no outside network."""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

CACHE_FOREVER = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class File:
    body: bytes
    content_type: str
    digest: str


class StaticFiles:
    def __init__(self) -> None:
        self._files: dict[str, File] = {}
        for entry in resources.files("admin_service.console").joinpath("static").iterdir():
            if entry.name.startswith(".") or not entry.is_file():
                continue
            body = entry.read_bytes()
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            self._files[entry.name] = File(body, kind, hashlib.sha256(body).hexdigest()[:12])

    def url(self, name: str) -> str:
        return f"/static/{self._files[name].digest}/{name}"

    async def serve(self, request: web.Request) -> web.Response:
        found = self._files.get(request.match_info["name"])
        if found is None or found.digest != request.match_info["digest"]:
            raise web.HTTPNotFound()
        return web.Response(body=found.body, headers={
            "Content-Type": found.content_type, "Cache-Control": CACHE_FOREVER,
            "ETag": f'"{found.digest}"'})
