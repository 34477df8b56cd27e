"""The live endpoint's ``twisted.web`` site: ``/live/`` (the operator page) and
``/live/v1/ws`` (the WebSocket).

The page's files are a fixed list read from the package at start (no directory listing,
no path from the request ever reaches the file system). Every answer carries a strict
Content-Security-Policy (scripts and styles from this origin only, no inline script;
images from this origin and the tile server; connections to this origin's WebSocket),
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``X-Frame-Options: DENY``.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Final

import attrs
import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site
from twisted.web.util import Redirect

from teltonika.processor.live.protocol import LiveFactory
from teltonika.processor.live.tiles import OSM_ATTRIBUTION, OSM_TILES, tile_source

STATIC_FILES: Final = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"live.js": ("live.js", b"text/javascript; charset=utf-8"),
    b"live.css": ("live.css", b"text/css; charset=utf-8"),
    b"leaflet.js": ("leaflet/leaflet.js", b"text/javascript; charset=utf-8"),
    b"leaflet.css": ("leaflet/leaflet.css", b"text/css; charset=utf-8"),
    b"LICENSE-leaflet.txt": ("leaflet/LICENSE", b"text/plain; charset=utf-8"),
}
"""URL name under ``/live/`` -> (file under ``static/``, content type)."""


@attrs.frozen
class PageConfig:
    """What the page reads from ``/live/config.json``.

    :ivar tiles: a Leaflet tile URL template, or None for the "no tiles" grid.
    """

    tiles: str | None = OSM_TILES
    attribution: str = OSM_ATTRIBUTION
    stale_after_ms: int = 60_000
    offline_after_ms: int = 300_000
    trail_minutes: float = 10.0

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "ws": "v1/ws",
                "tiles": self.tiles,
                "attribution": self.attribution,
                "stale_after_ms": self.stale_after_ms,
                "offline_after_ms": self.offline_after_ms,
                "trail_minutes": self.trail_minutes,
            }
        )


def security_headers(request: Request, tiles: str | None) -> None:
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    sockets = f" ws://{host} wss://{host}" if host and all(c not in host for c in " ;,'") else ""
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src 'self' data: {tile_source(tiles)}".rstrip()
        + f"; connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    request.setHeader(b"content-security-policy", policy.encode())
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")


class StaticFile(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes, tiles: str | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.body = body
        self.content_type = content_type
        self.tiles = tiles

    def render_GET(self, request: Request) -> bytes:
        security_headers(request, self.tiles)
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return self.body


class LiveSocket(WebSocketResource):
    """autobahn's resource, minus twisted.web's idle timer on the channel it hands over
    (the WebSocket has its own pings; the channel's timer would fire on a detached
    channel hours later)."""

    def render(self, request: Request) -> Any:
        request.channel.setTimeout(None)
        return super().render(request)  # type: ignore[no-untyped-call]


class LiveRoot(Resource):
    """``/live/...``"""

    def __init__(self, factory: LiveFactory, page: PageConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        static = files("teltonika.processor.live") / "static"
        for name, (path, content_type) in STATIC_FILES.items():
            self.putChild(name, StaticFile((static / path).read_bytes(), content_type, page.tiles))
        self.putChild(b"config.json", StaticFile(page.encode(), b"application/json", page.tiles))
        version = Resource()
        version.putChild(b"ws", LiveSocket(factory))  # type: ignore[no-untyped-call]
        self.putChild(b"v1", version)

    def getChild(self, path: bytes, request: Request) -> Resource:
        return NoResource()

    def render_GET(self, request: Request) -> bytes:
        request.redirect(b"/live/")
        return b""


def live_site(factory: LiveFactory, page: PageConfig) -> Site:
    root = Resource()
    root.putChild(b"live", LiveRoot(factory, page))
    root.putChild(b"", Redirect(b"/live/"))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site
