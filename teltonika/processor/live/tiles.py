"""Map tiles for the operator page: the default (OpenStreetMap's standard tiles, with the
attribution their usage policy asks for) and the Content-Security-Policy source a tile
URL template needs. Imported by the options, so it must not import autobahn."""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

OSM_TILES: Final = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
OSM_ATTRIBUTION: Final = (
    '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'
)


def tile_source(template: str | None) -> str:
    """The CSP source for the tile server (``{s}`` subdomains become a wildcard)."""
    if not template:
        return ""
    parts = urlsplit(template.replace("{s}", "a"))
    host = parts.netloc
    if "{s}." in template:
        host = "*." + host.split(".", 1)[1]
    return f"{parts.scheme}://{host}"
