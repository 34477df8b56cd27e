"""The telemetry record contract: what one stream entry (or JSON line) holds.

This module is the interface between the ingestion server, which writes entries, and
every consumer of ``telemetry:teltonika`` (our processor, and anyone else's). Its version
is the ``v`` field of every entry; README.rst, "The record contract", documents it field
by field. Change the layout only by adding a version and keeping the old one readable.

Version 1, one entry per AVL record, every value a string::

    v                "1"
    imei             15 digits
    codec            "8" | "8E" | "16"
    timestamp_ms     device time, ms since the Unix epoch (UTC)
    received_at_ms   server time the frame was received, ms
    latitude         degrees, decimal, up to 7 places, negative south
    longitude        degrees, decimal, up to 7 places, negative west
    altitude         metres (signed)
    angle            degrees
    speed            km/h
    satellites       count (0 = no valid fix)
    priority         0 low, 1 high, 2 panic
    event_io_id      IO id that triggered the record (0 = periodic)
    generation_type  codec 16 generation type, or "" for other codecs
    instance_id      the ingestion instance that received it
    io               JSON object {"<decimal IO id>": value}

An IO value is a JSON number when it is an integer up to 2**53 - 1 (every JSON parser
reads that exactly); a larger integer is ``{"__bigint": "<decimal>"}`` and an NX (variable
length, codec 8E) value is ``{"__buffer_b64": "<base64>"}``. IO values are unsigned, as
sent; the catalogue (``teltonika.catalogue``) says how to scale or sign them.

Serializer: ``orjson``, chosen by measurement (``benchmarks/decode.py``, part 2: the
``io`` JSON of realistic 8E records alone runs at about 86,000 records/s with
``json.dumps`` and a sentinel pre-pass, 236,000 with orjson and 148,000 with hand-written
bytes formatting; msgspec measured within noise of orjson and would be a second
dependency). :func:`entry_values` has orjson write the ten numbers too, in the same call.
"""

from __future__ import annotations

import re
from binascii import b2a_base64
from typing import Final

import orjson

from teltonika.wire.records import NX, AVLRecord, DeviceMessage, IOElement

CONTRACT_VERSION: Final = "1"
TELEMETRY_STREAM: Final = "telemetry:teltonika"
MESSAGES_STREAM: Final = "telemetry:teltonika:messages"
MAX_SAFE_INTEGER: Final = 2**53 - 1

FIELDS: Final = (
    "v",
    "imei",
    "codec",
    "timestamp_ms",
    "received_at_ms",
    "latitude",
    "longitude",
    "altitude",
    "angle",
    "speed",
    "satellites",
    "priority",
    "event_io_id",
    "generation_type",
    "instance_id",
    "io",
)
"""Field names of a version 1 entry, in the order they are written."""

_B_FIELDS: Final = tuple(name.encode() for name in FIELDS)
_FLAT_TEMPLATE: Final[list[bytes]] = [part for name in _B_FIELDS for part in (name, b"")]


def format_degrees(value: float) -> str:
    """Degrees as the shortest decimal that round-trips the device's degrees x 10^7."""
    scaled = round(value * 10_000_000)
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), 10_000_000)
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:07d}".rstrip("0")


_SHORTEST_DEGREES: Final = re.compile(rb"-?[0-9]+\.[0-9]{0,6}[1-9]")
"""orjson's shortest form of a float that is exactly some integer / 10^7 and not whole:
then it is also :func:`format_degrees`' form. Anything else (``25.0``, ``1e-7``, more
than seven decimals) goes through :func:`format_degrees`."""


def io_bag(io: tuple[IOElement, ...]) -> dict[int, object]:
    """The IO elements as a JSON-ready dict, with the contract's sentinels. An IO id a
    device sent twice in one record keeps its last value (README.rst, "The record
    contract": the processor reads a repeated key the same way)."""
    bag: dict[int, object] = {}
    for io_id, width, value in io:
        if 0 < width < 8:  # 1, 2 and 4 bytes: always a safe integer (the common case)
            bag[io_id] = value
        elif width == NX:
            assert isinstance(value, bytes)
            bag[io_id] = {"__buffer_b64": b2a_base64(value, newline=False).decode("ascii")}
        elif isinstance(value, int) and value > MAX_SAFE_INTEGER:
            bag[io_id] = {"__bigint": str(value)}
        else:
            bag[io_id] = value
    return bag


def io_json(io: tuple[IOElement, ...]) -> bytes:
    """The ``io`` field: :func:`io_bag` serialized as compact JSON (keys as strings)."""
    return orjson.dumps(io_bag(io), option=orjson.OPT_NON_STR_KEYS)


def entry_values(
    imei: str, codec_name: str, record: AVLRecord, received_at_ms: int, instance_id: str
) -> tuple[bytes, ...]:
    """The values of one version 1 entry, in :data:`FIELDS` order, as bytes.

    The ten numbers and the ``io`` object are written by one orjson call and split at
    the first ten commas: in CPython a single ``b"%d" % n`` costs about a third of
    orjson writing all of them (``benchmarks/decode.py``, part 2).
    """
    generation = record.generation_type
    written = orjson.dumps(
        (
            record.timestamp_ms,
            received_at_ms,
            record.latitude,
            record.longitude,
            record.altitude,
            record.angle,
            record.speed,
            record.satellites,
            record.priority,
            record.event_io_id,
            io_bag(record.io),
        ),
        option=orjson.OPT_NON_STR_KEYS,
    )
    timestamp, received, latitude, longitude, *numbers, io = written[1:-1].split(b",", 10)
    if not _SHORTEST_DEGREES.fullmatch(latitude):
        latitude = format_degrees(record.latitude).encode("ascii")
    if not _SHORTEST_DEGREES.fullmatch(longitude):
        longitude = format_degrees(record.longitude).encode("ascii")
    return (
        b"1",
        imei.encode("ascii"),
        codec_name.encode("ascii"),
        timestamp,
        received,
        latitude,
        longitude,
        *numbers,
        b"" if generation is None else b"%d" % generation,
        instance_id.encode("utf-8"),
        io,
    )


def entry_fields(
    imei: str, codec_name: str, record: AVLRecord, received_at_ms: int, instance_id: str
) -> list[bytes]:
    """One entry as the flat ``field, value, field, value ...`` list XADD takes."""
    flat = _FLAT_TEMPLATE.copy()  # names already in the even slots
    flat[1::2] = entry_values(imei, codec_name, record, received_at_ms, instance_id)
    return flat


def json_line(
    imei: str, codec_name: str, record: AVLRecord, received_at_ms: int, instance_id: str
) -> bytes:
    """One record as a JSON line for the file sink: the same fields, ``io`` as an object.

    Every value except ``io`` is the same string an entry holds, so a line and an entry
    read back through one parser.
    """
    values = entry_values(imei, codec_name, record, received_at_ms, instance_id)
    line: dict[str, object] = {
        name: value.decode("utf-8") for name, value in zip(FIELDS[:-1], values[:-1], strict=True)
    }
    line["io"] = io_bag(record.io)
    return orjson.dumps(line, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)


def message_fields(
    imei: str, message: DeviceMessage, codec_name: str, received_at_ms: int, instance_id: str
) -> dict[str, str]:
    """A device message (codec 12/13/14 that answered no command) for the messages stream.

    Fields: ``v``, ``imei``, ``codec``, ``type`` (decimal), ``payload_hex``, ``text``
    (the payload when printable, else ""), ``timestamp_ms`` (codec 13, else ""),
    ``received_at_ms``, ``instance_id``.
    """
    text = message.text
    return {
        "v": CONTRACT_VERSION,
        "imei": imei,
        "codec": codec_name,
        "type": str(message.message_type),
        "payload_hex": message.payload.hex(),
        "text": "" if text is None else text,
        "timestamp_ms": "" if message.timestamp_ms is None else str(message.timestamp_ms),
        "received_at_ms": str(received_at_ms),
        "instance_id": instance_id,
    }
