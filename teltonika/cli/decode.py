"""``teltonika decode``: hex frames in, one JSON object per frame out.

Accepts TCP frames (IMEI login packets and data frames) as hex, one per argument or one per
line of standard input with ``-``. Spaces, ``0x`` prefixes and colons are tolerated. An
invalid frame prints one line to stderr saying what is wrong; the command then exits 1, after
decoding the other frames of a batch.
"""

from __future__ import annotations

import argparse
import binascii
import json
import sys
from typing import Any, TextIO

from teltonika.catalogue import Catalogue
from teltonika.codecs import CodecRegistry, load_codecs
from teltonika.wire.errors import DecodeError
from teltonika.wire.login import parse_imei
from teltonika.wire.records import NX, AVLPacket, AVLRecord, MessagePacket


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "frame", help="one frame as hex, or - to read one hex frame per line from stdin"
    )
    parser.add_argument(
        "--named", action="store_true", help="add IO names and scaled values from the catalogue"
    )
    parser.add_argument(
        "--model", default=None, help="device model for per-model catalogue entries (with --named)"
    )
    parser.add_argument(
        "--catalogue",
        action="append",
        default=[],
        metavar="PATH",
        help="extra IO catalogue JSON file layered over the built-in one (repeatable)",
    )


def parse_hex(text: str) -> bytes:
    """Hex with optional spaces, colons, underscores and ``0x`` prefixes, as bytes."""
    cleaned = text.strip().lower().replace("0x", "")
    for separator in (" ", ":", "_", "\t", ","):
        cleaned = cleaned.replace(separator, "")
    return binascii.unhexlify(cleaned)


def record_json(
    record: AVLRecord, catalogue: Catalogue | None, model: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timestamp_ms": record.timestamp_ms,
        "priority": record.priority,
        "longitude": record.longitude,
        "latitude": record.latitude,
        "altitude": record.altitude,
        "angle": record.angle,
        "satellites": record.satellites,
        "speed": record.speed,
        "event_io_id": record.event_io_id,
    }
    if record.generation_type is not None:
        out["generation_type"] = record.generation_type
    out["io"] = {
        str(io_id): (value.hex() if width == NX and isinstance(value, bytes) else value)
        for io_id, width, value in record.io
    }
    if catalogue is not None:
        out["named"] = catalogue.named(record.io, model)
    return out


def decode_one(
    raw: bytes, registry: CodecRegistry, catalogue: Catalogue | None, model: str | None
) -> dict[str, Any]:
    """Decode one TCP frame (login packet or data frame) into its JSON view.

    :raise DecodeError: the frame is not valid.
    """
    if len(raw) >= 2 and raw[0] | raw[1]:
        length = int.from_bytes(raw[:2], "big")
        if len(raw) != 2 + length:
            raise DecodeError(f"IMEI packet declares {length} bytes but carries {len(raw) - 2}", 0)
        return {"imei": parse_imei(raw[2:])}
    codec, packet = registry.decode_frame(raw)
    if isinstance(packet, AVLPacket):
        return {
            "codec": codec.name,
            "records": [record_json(r, catalogue, model) for r in packet.records],
        }
    assert isinstance(packet, MessagePacket)
    message = packet.messages[0]
    out: dict[str, Any] = {
        "codec": codec.name,
        "type": message.message_type,
        "payload_hex": message.payload.hex(),
    }
    text = message.text
    if text is not None:
        out["text"] = text
    if message.imei is not None:
        out["imei"] = message.imei
    if message.timestamp_ms is not None:
        out["timestamp_ms"] = message.timestamp_ms
    if len(packet.messages) > 1:
        out["more_messages"] = len(packet.messages) - 1
    return out


def run(
    args: argparse.Namespace,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    registry = load_codecs()
    catalogue = Catalogue.load(args.catalogue) if args.named else None
    lines = (line for line in stdin) if args.frame == "-" else iter([args.frame])
    status = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"frame {number}: " if args.frame == "-" else ""
        try:
            raw = parse_hex(line)
        except (binascii.Error, ValueError) as error:
            print(f"{where}not hex: {error}", file=stderr)
            status = 1
            continue
        try:
            result = decode_one(raw, registry, catalogue, args.model)
        except DecodeError as error:
            print(f"{where}invalid frame: {type(error).__name__}: {error}", file=stderr)
            status = 1
            continue
        stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    return status
