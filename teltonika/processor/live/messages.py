"""The ``teltonika-live.v1`` wire messages (pure: no reactor, no logging, no Redis).

One UTF-8 JSON object per WebSocket text frame. README.rst, "Live positions", and
``docs/live-v1.rst`` describe the protocol; this module is its only encoder and parser:

* :func:`parse_request` turns one inbound frame into a :class:`Subscribe`,
  :class:`Unsubscribe` or :class:`Ping`, or raises :class:`RequestError` carrying the
  error code the connection answers with. Every byte comes from the network, so it never
  raises anything else (hypothesis checks that).
* :func:`position_from_entry` (and :func:`position_from_fields`) turns one stream entry
  into a :class:`LivePosition`, or None when the entry breaks the record contract (the
  writer's own check, :mod:`teltonika.processor.entries`, so the broadcast shows exactly
  the records PostgreSQL will hold, with the same record hash). The position's JSON is
  encoded once, here, and shared by every message it goes into; its :attr:`LivePosition.key`
  is the processor's "latest" key (:func:`teltonika.processor.state.make_latest_key`).
* the ``encode_*`` functions build server messages as bytes.

Times are integer epoch milliseconds; latitude and longitude are JSON numbers with at
most 7 decimals (the contract's precision), so browsers need no parsing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import attrs
import orjson

from teltonika.processor.entries import ContractError, Position, parse_entry, parse_fields
from teltonika.processor.state import LatestKey, make_latest_key

SUBPROTOCOL: Final = "teltonika-live.v1"
VERSION: Final = 1

# Close codes (RFC 6455 leaves 4000-4999 to applications).
CLOSE_NORMAL: Final = 1000
CLOSE_BAD_REQUEST: Final = 4400
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
CLOSE_TOO_MANY: Final = 4429
CLOSE_INTERNAL: Final = 4500
CLOSE_GOING_AWAY: Final = 4503

# Error codes.
INVALID_PAYLOAD: Final = "INVALID_PAYLOAD"
UNKNOWN_TYPE: Final = "UNKNOWN_TYPE"
DUPLICATE_ID: Final = "DUPLICATE_ID"
UNKNOWN_ID: Final = "UNKNOWN_ID"
FORBIDDEN: Final = "FORBIDDEN"
TOO_MANY_SUBSCRIPTIONS: Final = "TOO_MANY_SUBSCRIPTIONS"
TOO_MANY_DEVICES: Final = "TOO_MANY_DEVICES"
RATE_LIMITED: Final = "RATE_LIMITED"
UNAUTHENTICATED: Final = "UNAUTHENTICATED"
UPSTREAM_UNAVAILABLE: Final = "UPSTREAM_UNAVAILABLE"
INTERNAL: Final = "INTERNAL"
TOO_MANY_CONNECTIONS: Final = "TOO_MANY_CONNECTIONS"

ERROR_CODES: Final = (
    INVALID_PAYLOAD,
    UNKNOWN_TYPE,
    DUPLICATE_ID,
    UNKNOWN_ID,
    FORBIDDEN,
    TOO_MANY_SUBSCRIPTIONS,
    TOO_MANY_DEVICES,
    RATE_LIMITED,
    UNAUTHENTICATED,
    UPSTREAM_UNAVAILABLE,
    INTERNAL,
    TOO_MANY_CONNECTIONS,
)

COMPLETE_REVOKED: Final = "REVOKED"
COMPLETE_SHUTDOWN: Final = "SHUTDOWN"

MAX_ID_CHARS: Final = 64
MAX_EVENT_CHARS: Final = 64
_IMEI: Final = re.compile(r"[0-9]{15}")
_EVENT: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class RequestError(ValueError):
    """An inbound message the server answers with an ``error``.

    :ivar code: one of :data:`ERROR_CODES`.
    :ivar request_id: the request's ``id`` when it had a usable one, else None (the error
        then concerns the connection, not a subscription).
    :ivar fatal: the connection is closed with 4400 after the error (the peer does not
        speak JSON objects at all).
    """

    def __init__(
        self, code: str, message: str, request_id: str | None = None, *, fatal: bool = False
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.fatal = fatal


@attrs.frozen(slots=True)
class Subscribe:
    """``subscribe``: exactly one of *event* or *devices* is set."""

    id: str
    event: str | None = None
    devices: tuple[str, ...] | None = None


@attrs.frozen(slots=True)
class Unsubscribe:
    id: str


@attrs.frozen(slots=True)
class Ping:
    id: str


Request = Subscribe | Unsubscribe | Ping


def _request_id(message: Mapping[str, object]) -> str | None:
    value = message.get("id")
    if isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS:
        return value
    return None


def parse_request(payload: bytes, max_devices: int) -> Request:
    """Parse one inbound text frame.

    :param max_devices: the most devices a ``devices`` subscription may list.
    :raise RequestError: for anything that is not a valid v1 request.
    """
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise RequestError(INVALID_PAYLOAD, "not JSON", fatal=True) from None
    if not isinstance(message, dict):
        raise RequestError(INVALID_PAYLOAD, "not a JSON object", fatal=True)
    kind = message.get("type")
    request_id = _request_id(message)
    if not isinstance(kind, str):
        raise RequestError(INVALID_PAYLOAD, "type must be a string", request_id)
    if kind not in ("subscribe", "unsubscribe", "ping"):
        raise RequestError(UNKNOWN_TYPE, f"unknown type {kind[:40]!r}", request_id)
    if request_id is None:
        raise RequestError(INVALID_PAYLOAD, f"id must be a string of 1-{MAX_ID_CHARS} characters")
    if kind == "ping":
        return Ping(request_id)
    if kind == "unsubscribe":
        return Unsubscribe(request_id)
    event = message.get("event")
    devices = message.get("devices")
    if (event is None) == (devices is None):
        raise RequestError(
            INVALID_PAYLOAD, "subscribe needs exactly one of event or devices", request_id
        )
    if event is not None:
        if not isinstance(event, str) or _EVENT.fullmatch(event) is None:
            raise RequestError(
                INVALID_PAYLOAD,
                f"event must be 1-{MAX_EVENT_CHARS} letters, digits or _.:-",
                request_id,
            )
        return Subscribe(request_id, event=event)
    if not isinstance(devices, list) or not devices:
        raise RequestError(INVALID_PAYLOAD, "devices must be a non-empty list", request_id)
    if len(devices) > max_devices:
        raise RequestError(TOO_MANY_DEVICES, f"at most {max_devices} devices", request_id)
    for device in devices:
        if not isinstance(device, str) or _IMEI.fullmatch(device) is None:
            raise RequestError(INVALID_PAYLOAD, "a device is not a 15-digit IMEI", request_id)
    return Subscribe(request_id, devices=tuple(dict.fromkeys(devices)))


@attrs.frozen(slots=True)
class LivePosition:
    """One record as the live broadcast sends it.

    :ivar key: where the record stands among the device's records: the processor's
        "latest" key (``ts``, then an event record before a periodic one, then priority,
        then record hash; :mod:`teltonika.processor.state`). Larger is later; equal is
        the same record.
    :ivar wire: this position's JSON object as bytes (with ``device``), encoded once.
    """

    device: str
    ts: int
    rx: int
    lat: float
    lon: float
    alt: int
    speed: int
    heading: int
    sats: int
    key: LatestKey
    wire: bytes = attrs.field(eq=False, repr=False)

    @property
    def fix(self) -> bool:
        """A record with 0 satellites has no valid fix (its coordinates are the last
        known ones, or zero): newer in time, sent, drawn hollow."""
        return self.sats > 0

    def body(self) -> dict[str, object]:
        """The ``position`` object of a snapshot entry (no ``device``)."""
        return {
            "ts": self.ts,
            "lat": self.lat,
            "lon": self.lon,
            "alt": self.alt,
            "speed": self.speed,
            "heading": self.heading,
            "sats": self.sats,
            "fix": self.fix,
            "rx": self.rx,
        }


def make_position(
    device: str,
    ts: int,
    rx: int,
    lat: float,
    lon: float,
    alt: int,
    speed: int,
    heading: int,
    sats: int,
    *,
    event_io_id: int,
    priority: int,
    record_hash: int,
) -> LivePosition:
    """A :class:`LivePosition` with its JSON encoded (latitude/longitude rounded to the
    contract's 7 decimals, so a binary float never shows 15 digits) and its key. The
    three keyword values are not sent: they only decide between records of one instant."""
    lat = round(lat, 7)
    lon = round(lon, 7)
    wire = orjson.dumps(
        {
            "device": device,
            "ts": ts,
            "lat": lat,
            "lon": lon,
            "alt": alt,
            "speed": speed,
            "heading": heading,
            "sats": sats,
            "fix": sats > 0,
            "rx": rx,
        }
    )
    key = make_latest_key(ts, event_io_id, priority, record_hash)
    return LivePosition(device, ts, rx, lat, lon, alt, speed, heading, sats, key, wire)


def position_from_record(record: Position) -> LivePosition | None:
    """The live position of a record that passed the contract check, or None when its
    coordinates are off the globe (the contract bounds their digits, not their range)."""
    latitude, longitude = float(record.latitude), float(record.longitude)
    if not (-90.0 <= latitude <= 90.0 and -180.0 <= longitude <= 180.0):
        return None
    return make_position(
        record.device_id,
        record.timestamp_ms,
        record.received_at_ms,
        latitude,
        longitude,
        int(record.altitude),
        int(record.speed),
        int(record.angle),
        int(record.satellites),
        event_io_id=int(record.event_io_id),
        priority=int(record.priority),
        record_hash=record.record_hash,
    )


def position_from_entry(entry_id: str, flat: object) -> LivePosition | None:
    """The live position of one stream entry as Redis replies it (``field value ...``),
    or None when the entry breaks the record contract: the writer dead-letters it, so
    it is never anyone's latest position."""
    if not isinstance(flat, list):
        return None
    try:
        record = parse_fields(entry_id, flat)
    except ContractError:
        return None
    return position_from_record(record)


def position_from_fields(fields: Mapping[str, object]) -> LivePosition | None:
    """:func:`position_from_entry` for an entry already read into a mapping."""
    try:
        record = parse_entry("", fields)
    except ContractError:
        return None
    return position_from_record(record)


# -- server messages -------------------------------------------------------------------


def _dumps(message: Mapping[str, object]) -> bytes:
    return orjson.dumps(message)


def encode_hello(
    server: str,
    instance: str,
    user: str | None,
    now: int,
    tick: float,
    timeout: float,
    limits: Mapping[str, int],
) -> bytes:
    return _dumps(
        {
            "type": "hello",
            "v": VERSION,
            "server": server,
            "instance": instance,
            "user": user,
            "now": now,
            "heartbeat": {"tick": tick, "timeout": timeout},
            "limits": dict(limits),
        }
    )


@attrs.frozen(slots=True)
class Member:
    """A device of a subscription: its event entry and label (None outside events)."""

    device: str
    entry: str | None = None
    label: str | None = None


@attrs.frozen(slots=True)
class DeviceView:
    """What a snapshot or ``devices`` message says about one device."""

    member: Member
    seen: int | None
    position: LivePosition | None

    def encode(self) -> dict[str, object]:
        return {
            "device": self.member.device,
            "entry": self.member.entry,
            "label": self.member.label,
            "seen": self.seen,
            "position": None if self.position is None else self.position.body(),
        }


def encode_snapshot(
    request_id: str, event: str | None, now: int, devices: Iterable[DeviceView]
) -> bytes:
    message: dict[str, object] = {"type": "snapshot", "id": request_id}
    if event is not None:
        message["event"] = event
    message["now"] = now
    message["devices"] = [view.encode() for view in devices]
    return _dumps(message)


def encode_devices(
    request_id: str, added: Iterable[DeviceView], removed: Iterable[str], now: int
) -> bytes:
    return _dumps(
        {
            "type": "devices",
            "id": request_id,
            "now": now,
            "added": [view.encode() for view in added],
            "removed": list(removed),
        }
    )


def encode_positions_array(positions: Sequence[LivePosition]) -> bytes:
    """The JSON array of *positions*, built from their pre-encoded objects: the part of a
    ``positions`` message shared by every subscriber of one event."""
    return b"[" + b",".join(p.wire for p in positions) + b"]"


def positions_parts(request_id: str, skipped: int, array: bytes) -> tuple[bytes, bytes, bytes]:
    """A ``positions`` message around a shared :func:`encode_positions_array`, as three
    parts (the shared array in the middle is never copied per client)."""
    prefix = (
        b'{"type":"positions","id":'
        + orjson.dumps(request_id)
        + b',"skipped":'
        + str(skipped).encode()
        + b',"positions":'
    )
    return prefix, array, b"}"


def encode_positions(request_id: str, skipped: int, array: bytes) -> bytes:
    """:func:`positions_parts` joined."""
    return b"".join(positions_parts(request_id, skipped, array))


def encode_seen(request_id: str, seen: Mapping[str, int]) -> bytes:
    return _dumps(
        {
            "type": "seen",
            "id": request_id,
            "devices": [{"device": d, "seen": s} for d, s in seen.items()],
        }
    )


def encode_complete(request_id: str, reason: str) -> bytes:
    return _dumps({"type": "complete", "id": request_id, "reason": reason})


def encode_unsubscribed(request_id: str) -> bytes:
    return _dumps({"type": "unsubscribed", "id": request_id})


def encode_pong(request_id: str, now: int) -> bytes:
    return _dumps({"type": "pong", "id": request_id, "now": now})


def encode_tick(now: int) -> bytes:
    return _dumps({"type": "tick", "now": now})


def encode_error(
    code: str,
    message: str,
    request_id: str | None = None,
    *,
    ref: str | None = None,
    request: str | None = None,
) -> bytes:
    """An ``error``. With *request_id* it ends that subscription only; without, it
    concerns the connection. *request* names a request that was refused without touching
    the subscription of that id (``DUPLICATE_ID``); *ref* ties an ``INTERNAL`` to its log
    event."""
    error: dict[str, object] = {"code": code, "message": message}
    if ref is not None:
        error["ref"] = ref
    out: dict[str, object] = {"type": "error"}
    if request_id is not None:
        out["id"] = request_id
    if request is not None:
        out["request"] = request
    out["error"] = error
    return _dumps(out)
