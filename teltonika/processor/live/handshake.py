"""The handshake's pure decisions: is this ``Origin`` allowed, and what credential did
the client present. No reactor, no I/O.

Origins (README.rst, "Live positions"): a browser's ``Origin`` must be the page's own
origin (the ``Host`` it connected to, http or https: a TLS proxy in front changes the
scheme, not the host) or one of ``--live-allowed-origin``, compared as scheme, host and
port; ``null`` is refused; no ``Origin`` at all is a non-browser client and allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import urlsplit

from teltonika.processor.live.interfaces import Credential

Origin = tuple[str, str, int]
"""(scheme, host, port), lower case, default ports filled in."""

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_BEARER: Final = re.compile(r"[A-Za-z0-9._~+/=-]{1,4096}")
_COOKIE_VALUE: Final = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]{1,4096}")
_HOST: Final = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")


class OriginError(ValueError):
    """An origin that cannot be parsed."""


def parse_origin(text: str) -> Origin:
    """``scheme://host[:port]`` as an :data:`Origin`.

    :raise OriginError: not an http(s) origin with a host and nothing else.
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise OriginError(f"not an origin: {text[:80]!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise OriginError(f"not an http(s) origin: {text[:80]!r}")
    if parts.query or parts.fragment or parts.username is not None:
        raise OriginError(f"not an origin: {text[:80]!r}")
    return scheme, parts.hostname.lower(), DEFAULT_PORTS[scheme] if port is None else port


def parse_allowed(values: Iterable[str]) -> frozenset[Origin]:
    """The ``--live-allowed-origin`` values (raises :class:`OriginError`)."""
    return frozenset(parse_origin(value) for value in values)


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[Origin]) -> bool:
    """See the module docstring."""
    if origin is None:
        return True
    if origin.strip().lower() == "null":
        return False
    try:
        scheme, origin_host, origin_port = parse_origin(origin)
    except OriginError:
        return False
    if (scheme, origin_host, origin_port) in allowed:
        return True
    if host is None:
        return False
    match = _HOST.fullmatch(host.strip())
    if match is None:
        return False
    own_host = match.group(1).lower().strip("[]")
    own_port = int(match.group(2)) if match.group(2) else DEFAULT_PORTS[scheme]
    return origin_host.strip("[]") == own_host and origin_port == own_port


def credential_from_headers(headers: Mapping[str, str], cookie_name: str) -> Credential | None:
    """The bearer token, else the session cookie named *cookie_name*, else None.

    Values with characters a token or cookie cannot hold are ignored (they would be
    copied into a header of the request to Directus).
    """
    authorization = headers.get("authorization", "").strip()
    if authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
        if _BEARER.fullmatch(token):
            return Credential("bearer", token)
    for part in re.split(r"[;,]", headers.get("cookie", "")):
        name, sep, value = part.strip().partition("=")
        if sep and name == cookie_name:
            value = value.strip().strip('"')
            if _COOKIE_VALUE.fullmatch(value):
                return Credential("cookie", value, cookie_name)
    return None
