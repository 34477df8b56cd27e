"""The ``--live*`` options of ``twistd teltonika-processor``, as a base class of its Options.

Twisted's ``usage.Options`` gathers ``optParameters`` from every class of the hierarchy,
so the processor's Options only derive from :class:`LiveOptions` and call
:meth:`LiveOptions.check_live` from ``postOptions``. Each value is checked by its coercer
(the :mod:`teltonika.options` idiom: the ``UsageError`` names the option and the value);
:meth:`LiveOptions.check_live` keeps the rules between options.
"""

from __future__ import annotations

import re
from typing import Any, Final

from twisted.python import usage

from teltonika.options import (
    OFF,
    CoercedOptions,
    documented,
    positive_number,
    positive_seconds,
    positive_whole_number,
)
from teltonika.processor.live.handshake import Origin, OriginError, parse_origin
from teltonika.processor.live.tiles import OSM_ATTRIBUTION, OSM_TILES

AUTH_FORMS: Final = "directus:URL, token-file:PATH or none"
_INTERFACE = re.compile(r"interface=((?:\\.|[^:])*)")
_LOOPBACK = re.compile(r"(127\.\d{1,3}\.\d{1,3}\.\d{1,3}|::1|localhost)")


LISTEN_BACKLOG: Final = 1024
"""Pending connections the kernel queues for a bare ``--live`` port (Twisted's default is
50): when an instance goes away its clients reconnect to the others all at once."""


def live_endpoint(value: str) -> str:
    """A bare port means loopback, like ``--metrics`` (with a deeper listen backlog)."""
    value = value.strip()
    if value.isdigit():
        return f"tcp:{value}:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
    return value


def is_loopback(endpoint: str) -> bool:
    """Whether a server endpoint description only listens on loopback (or a UNIX socket)."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind == "unix":
        return True
    match = _INTERFACE.search(endpoint)
    if match is None:
        return False
    interface = match.group(1).replace("\\:", ":").strip("[]")
    return _LOOPBACK.fullmatch(interface) is not None


@documented(AUTH_FORMS + ".")
def live_auth(value: str) -> str:
    """``--live-auth``: one of its three forms, a Directus URL over http(s)."""
    auth = value.strip()
    kind, _, argument = auth.partition(":")
    if kind not in ("directus", "token-file", "none") or (kind != "none") != bool(argument):
        raise ValueError(f"must be {AUTH_FORMS}, not {value!r}")
    if kind == "directus" and not argument.startswith(("http://", "https://")):
        raise ValueError(f"directus:URL needs an http:// or https:// URL, not {value!r}")
    return auth


@documented("file:PATH or directus.")
def live_events(value: str) -> str:
    """``--live-events``."""
    if value != "directus" and not value.startswith("file:"):
        raise ValueError(f"must be file:PATH or directus, not {value!r}")
    return value


@documented("A tile URL template, or none.")
def live_tiles(value: str) -> str | None:
    """``--live-tiles``: ``none``/``off`` (a plain grid) -> ``None``."""
    tiles = value.strip()
    return None if tiles.lower() in OFF else tiles


def live_origin(value: str) -> Origin:
    """One ``--live-allowed-origin`` (:func:`~teltonika.processor.live.handshake.parse_origin`).

    :raise usage.UsageError: naming the option (its message shows the value).
    """
    try:
        return parse_origin(value)
    except OriginError as e:
        raise usage.UsageError(f"--live-allowed-origin: {e}") from None


class LiveOptions(CoercedOptions):
    """``--live`` and its companions (README.rst, "Live positions"); the processor's
    Options derive from this class."""

    optParameters: list[list[Any]] = [  # noqa: N815
        [
            "live-auth",
            None,
            "none",
            f"Who may connect to --live: {AUTH_FORMS} (none only on loopback).",
            live_auth,
        ],
        [
            "live-events",
            None,
            None,
            "Events and their devices: file:PATH (JSON), or directus (the default with "
            "--live-auth directus:URL).",
            live_events,
        ],
        [
            "live-session-cookie",
            None,
            "directus_session_token",
            "The Directus session cookie forwarded to /users/me.",
        ],
        [
            "live-directus-token-file",
            None,
            None,
            "File holding the processor's own Directus token (reads event entries).",
        ],
        ["live-directus-timeout", None, 3.0, "Seconds a Directus call may take.", positive_seconds],
        ["live-event-collection", None, "events", "Directus collection of events."],
        ["live-entry-collection", None, "entries", "Directus collection of event entries."],
        ["live-entry-event-field", None, "event", "Entry field holding the event id."],
        ["live-entry-imei-field", None, "imei", "Entry field (dotted path) holding the IMEI."],
        ["live-entry-label-field", None, "label", "Entry field (dotted path) holding the label."],
        ["live-device-collection", None, "devices", "Directus collection of devices (imei)."],
        [
            "live-max-connections",
            None,
            10_000,
            "Most live connections at once.",
            positive_whole_number,
        ],
        [
            "live-max-per-user",
            None,
            20,
            "Most live connections of one user.",
            positive_whole_number,
        ],
        [
            "live-max-subscriptions",
            None,
            8,
            "Most subscriptions on one connection.",
            positive_whole_number,
        ],
        [
            "live-max-devices",
            None,
            2000,
            "Most devices in one subscription.",
            positive_whole_number,
        ],
        [
            "live-max-message",
            None,
            65536,
            "Largest inbound message (bytes).",
            positive_whole_number,
        ],
        [
            "live-max-rate",
            None,
            20.0,
            "Inbound messages a second per connection.",
            positive_seconds,
        ],
        [
            "live-reauth",
            None,
            600.0,
            "Seconds between re-checks of a connection's rights.",
            positive_seconds,
        ],
        [
            "live-resolve-interval",
            None,
            60.0,
            "Seconds between re-reads of a watched event's devices.",
            positive_seconds,
        ],
        [
            "live-max-future",
            None,
            300.0,
            "Seconds ahead of the server clock beyond which a position is ignored.",
            positive_seconds,
        ],
        [
            "live-slow-timeout",
            None,
            30.0,
            "Seconds a client may stop reading before it is evicted.",
            positive_seconds,
        ],
        [
            "live-drain",
            None,
            10.0,
            "Seconds over which live sockets are closed at shutdown.",
            positive_seconds,
        ],
        [
            "live-tick",
            None,
            25.0,
            "Seconds of silence after which a tick is sent.",
            positive_seconds,
        ],
        ["live-ping-interval", None, 25.0, "Seconds between WebSocket pings.", positive_seconds],
        [
            "live-ping-timeout",
            None,
            20.0,
            "Seconds a pong may take before the connection is dropped.",
            positive_seconds,
        ],
        [
            "live-seen-interval",
            None,
            15.0,
            "Seconds between seen messages at most.",
            positive_seconds,
        ],
        [
            "live-flush-interval",
            None,
            0.1,
            "Longest wait of a position before it is sent (batching).",
            positive_seconds,
        ],
        [
            "live-tiles",
            None,
            OSM_TILES,
            "Map tile URL template for the page, or none (grid).",
            live_tiles,
        ],
        ["live-tiles-attribution", None, OSM_ATTRIBUTION, "Attribution shown under the tiles."],
        ["live-trail-minutes", None, 10.0, "Minutes of trail drawn per device.", positive_number],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["live"] = []
        self["live-allowed-origin"] = []
        self["live-origins"] = frozenset()

    def opt_live(self, endpoint: str) -> None:
        """Serve the live broadcast and the operator page on this endpoint (a port number
        means loopback; repeatable; off unless given)."""
        self["live"].append(live_endpoint(endpoint))

    def opt_live_allowed_origin(self, origin: str) -> None:
        """An origin (scheme://host[:port]) besides the page's own whose pages may
        connect (repeatable)."""
        self["live-origins"] = self["live-origins"] | {live_origin(origin)}
        self["live-allowed-origin"].append(origin)

    def check_live(self) -> None:
        """Validate the live options (called from ``postOptions``)."""
        if self["live"]:
            try:
                import autobahn.twisted  # noqa: F401
                import treq  # noqa: F401
            except ImportError as e:
                raise usage.UsageError(
                    "--live needs autobahn and treq: pip install 'teltonika[processor]' "
                    f"(or '.[processor]' from a checkout) ({e})"
                ) from None
        kind = str(self["live-auth"]).partition(":")[0]
        if kind == "none":
            exposed = [e for e in self["live"] if not is_loopback(e)]
            if exposed:
                raise usage.UsageError(
                    "--live-auth none is only allowed when every --live endpoint listens on "
                    f"loopback; {exposed[0]} does not (give --live-auth directus:URL or "
                    "token-file:PATH)"
                )
        if self["live-events"] == "directus" and kind != "directus":
            raise usage.UsageError("--live-events directus needs --live-auth directus:URL")
