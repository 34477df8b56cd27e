"""Decode speed: our codecs against the simplest correct pure-Python decoder, in one run.

Usage::

    python benchmarks/decode.py              # about a minute on one core
    python benchmarks/decode.py --seconds 3  # steadier figures

Part 1 decodes whole TCP frames (envelope, CRC-16/IBM and records) through
``load_codecs().decode_frame`` for codecs 8, 8E and 16, with small (1 record) and large
(10 and 50 record) frames of realistic records: 21 IO elements across the four widths,
plus two NX elements for 8E. The baseline is :func:`baseline_decode`, the simplest correct
``struct``-based decoder (one ``unpack_from`` per field, a table-driven CRC loop in pure
Python). Its output is checked against ours before anything is timed. A second baseline
column swaps only its CRC for fastcrc, to show how much of the gap is the CRC.

Part 2 times decode plus turning every record into the stream entry the server publishes
(``teltonika.contract.entry_fields``) and compares serializers for the ``io`` JSON
(the contract's sentinels included). Part 3 times building a record as a frozen attrs
instance against the cheaper immutable alternatives.

Figures are single-core wall-clock rates on a shared machine: compare the ratios printed
in one run, not absolute numbers across runs. Targets (issue 3): decode >= 1.0x the
baseline and >= 100,000 codec-8E records/s; decode + entry >= 50,000 records/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import sys
import time
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script from anywhere: import the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attrs
import orjson

from teltonika import contract
from teltonika.codecs import load_codecs
from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    NX,
    AVLRecord,
    encode_avl_frame,
)
from teltonika.wire.crc import crc16

try:
    import msgspec
except ImportError:  # optional: only a comparison column
    msgspec = None

# --- realistic frames -------------------------------------------------------------------

# (id, width) of a typical FMB/FMC periodic record: ignition, movement, data mode, GSM
# signal, sleep mode, GNSS status, digital inputs, green driving type; voltages, current,
# speed, PDOP/HDOP, analog input; odometers, operator, Dallas temperature; iButton, ICCID.
IO_LAYOUT = [
    *[(239, 1), (240, 1), (80, 1), (21, 1), (200, 1), (69, 1), (1, 1), (253, 1)],
    *[(66, 2), (67, 2), (68, 2), (24, 2), (181, 2), (182, 2), (9, 2)],
    *[(16, 4), (199, 4), (241, 4), (72, 4)],
    *[(78, 8), (11, 8)],
]
NX_ELEMENTS = [(385, bytes(range(23))), (256, b"WVWZZZ1JZXW000001")]


def realistic_record(index: int, codec_id: int) -> AVLRecord:
    """A plausible record: moving vehicle, 21 IO elements, NX ones for 8E."""
    io: list[tuple[int, int, int | bytes]] = []
    for n, (io_id, width) in enumerate(IO_LAYOUT):
        io.append((io_id, width, (index * 7919 + n * 104729 + io_id) % (1 << (8 * width))))
    if codec_id == CODEC_8E:
        io.extend((io_id, NX, value) for io_id, value in NX_ELEMENTS)
    return AVLRecord(
        timestamp_ms=1_700_000_000_000 + index * 1000,
        priority=index % 2,
        longitude=(254_000_000 + index * 137) / 1e7,
        latitude=(-546_000_000 - index * 71) / 1e7,
        altitude=120 + index % 30,
        angle=(index * 13) % 360,
        satellites=9,
        speed=index % 120,
        event_io_id=240 if index % 10 == 0 else 0,
        io=tuple(io),
        generation_type=7 if codec_id == CODEC_16 else None,
    )


def make_frame(codec_id: int, count: int) -> bytes:
    return encode_avl_frame(codec_id, [realistic_record(i, codec_id) for i in range(count)])


# --- the baseline: the simplest correct struct-based decoder ----------------------------


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


CRC_TABLE = _crc_table()


def pure_crc16(data: bytes) -> int:
    """CRC-16/IBM with a table, one byte per loop iteration."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


class BaselineError(Exception):
    pass


def baseline_decode(frame: bytes, crc: Callable[[bytes], int] = pure_crc16) -> list[dict[str, Any]]:
    """Decode a TCP AVL frame the straightforward way: checks, then one field at a time."""
    if len(frame) < 12 or frame[:4] != b"\x00\x00\x00\x00":
        raise BaselineError("envelope")
    (length,) = struct.unpack_from(">I", frame, 4)
    if length + 12 != len(frame):
        raise BaselineError("length")
    end = 8 + length
    (crc_field,) = struct.unpack_from(">I", frame, end)
    if crc(frame[8:end]) != crc_field:
        raise BaselineError("crc")
    codec_id, count = struct.unpack_from(">BB", frame, 8)
    if codec_id == CODEC_8:
        id_fmt, count_fmt, generation = ">B", ">B", False
    elif codec_id == CODEC_8E:
        id_fmt, count_fmt, generation = ">H", ">H", False
    elif codec_id == CODEC_16:
        id_fmt, count_fmt, generation = ">H", ">B", True
    else:
        raise BaselineError("codec")
    id_size, count_size = struct.calcsize(id_fmt), struct.calcsize(count_fmt)
    offset = 10
    records = []
    try:
        for _ in range(count):
            ts, priority, lon, lat, alt, angle, sats, speed = struct.unpack_from(
                ">QBiihHBH", frame, offset
            )
            offset += 24
            (event,) = struct.unpack_from(id_fmt, frame, offset)
            offset += id_size
            gen = None
            if generation:
                (gen,) = struct.unpack_from(">B", frame, offset)
                offset += 1
            (total,) = struct.unpack_from(count_fmt, frame, offset)
            offset += count_size
            io: dict[int, int | bytes] = {}
            seen = 0
            for width, value_fmt in ((1, ">B"), (2, ">H"), (4, ">I"), (8, ">Q")):
                (n,) = struct.unpack_from(count_fmt, frame, offset)
                offset += count_size
                for _ in range(n):
                    (io_id,) = struct.unpack_from(id_fmt, frame, offset)
                    (value,) = struct.unpack_from(value_fmt, frame, offset + id_size)
                    io[io_id] = value
                    offset += id_size + width
                seen += n
            if codec_id == CODEC_8E:
                (n,) = struct.unpack_from(">H", frame, offset)
                offset += 2
                for _ in range(n):
                    io_id, size = struct.unpack_from(">HH", frame, offset)
                    offset += 4
                    if offset + size > end:
                        raise BaselineError("nx")
                    io[io_id] = frame[offset : offset + size]
                    offset += size
                seen += n
            if seen != total or offset > end - 1:
                raise BaselineError("io")
            records.append(
                {
                    "timestamp_ms": ts,
                    "priority": priority,
                    "longitude": lon / 1e7,
                    "latitude": lat / 1e7,
                    "altitude": alt,
                    "angle": angle,
                    "satellites": sats,
                    "speed": speed,
                    "event_io_id": event,
                    "generation_type": gen,
                    "io": io,
                }
            )
    except struct.error:
        raise BaselineError("truncated") from None
    if offset != end - 1 or frame[end - 1] != count:
        raise BaselineError("count")
    return records


def check_baseline_agrees(frame: bytes) -> None:
    """Refuse to time a baseline that does not decode what we decode."""
    _codec, packet = REGISTRY.decode_frame(frame)
    ours = [
        {
            "timestamp_ms": r.timestamp_ms,
            "priority": r.priority,
            "longitude": r.longitude,
            "latitude": r.latitude,
            "altitude": r.altitude,
            "angle": r.angle,
            "satellites": r.satellites,
            "speed": r.speed,
            "event_io_id": r.event_io_id,
            "generation_type": r.generation_type,
            "io": r.io_values(),
        }
        for r in packet.records  # type: ignore[union-attr]
    ]
    if baseline_decode(frame) != ours:
        raise SystemExit("baseline and teltonika decoders disagree: benchmark invalid")


# --- timing -------------------------------------------------------------------------------

REGISTRY = load_codecs()


def rate(function: Callable[[], Any], seconds: float) -> float:
    """Calls per second of *function*, best of a few rounds within about *seconds*."""
    number = 1
    while True:  # calibrate to rounds of ~1/10 of the budget
        start = time.perf_counter()
        for _ in range(number):
            function()
        elapsed = time.perf_counter() - start
        if elapsed > seconds / 20 or number > 1 << 24:
            break
        number *= 2
    per_round = max(1, int(number * (seconds / 10) / max(elapsed, 1e-9)))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    gc.collect()
    while True:
        start = time.perf_counter()
        for _ in range(per_round):
            function()
        best = min(best, (time.perf_counter() - start) / per_round)
        if time.perf_counter() > deadline:
            break
    return 1.0 / best


def fmt(value: float) -> str:
    return f"{value:>11,.0f}"


# --- part 1: decode -----------------------------------------------------------------------


def part_decode(seconds: float) -> dict[tuple[str, int], float]:
    print("1. decode_frame (envelope + CRC + records), records/s and frames/s")
    print(
        f"{'codec':>5} {'recs':>4} {'bytes':>6} | {'teltonika rec/s':>15} {'frames/s':>10} |"
        f" {'baseline rec/s':>14} {'ratio':>6} | {'base+fastcrc':>12} {'ratio':>6}"
    )
    results = {}
    decode = REGISTRY.decode_frame
    for codec_id, name in ((CODEC_8, "8"), (CODEC_8E, "8E"), (CODEC_16, "16")):
        for count in (1, 10, 50):
            frame = make_frame(codec_id, count)
            check_baseline_agrees(frame)
            ours = rate(lambda f=frame: decode(f), seconds)
            base = rate(lambda f=frame: baseline_decode(f), seconds)
            base_fast = rate(lambda f=frame: baseline_decode(f, crc16), seconds)
            results[(name, count)] = ours * count
            print(
                f"{name:>5} {count:>4} {len(frame):>6} | {fmt(ours * count):>15}"
                f" {ours:>10,.0f} | {fmt(base * count):>14} {ours / base:>5.2f}x |"
                f" {fmt(base_fast * count):>12} {ours / base_fast:>5.2f}x"
            )
    return results


# --- part 2: decode + entry, serializers --------------------------------------------------


def bag_stdlib(io: tuple[Any, ...]) -> bytes:
    return json.dumps(contract.io_bag(io), separators=(",", ":")).encode()


def bag_orjson(io: tuple[Any, ...]) -> bytes:
    return orjson.dumps(contract.io_bag(io), option=orjson.OPT_NON_STR_KEYS)


def bag_msgspec(io: tuple[Any, ...]) -> bytes:
    return msgspec.json.encode(contract.io_bag(io))  # type: ignore[no-any-return]


def bag_handrolled(io: tuple[Any, ...]) -> bytes:
    """Hand-written JSON for this one shape (ids and values are ints or sentinels)."""
    parts = []
    for io_id, width, value in io:
        if width == NX:
            parts.append(b'"%d":{"__buffer_b64":"%s"}' % (io_id, b64encode(value)))
        elif value > contract.MAX_SAFE_INTEGER:
            parts.append(b'"%d":{"__bigint":"%d"}' % (io_id, value))
        else:
            parts.append(b'"%d":%d' % (io_id, value))
    return b"{" + b",".join(parts) + b"}"


def part_entry(seconds: float) -> None:
    print()
    print("2. decode + stream entry (teltonika.contract.entry_fields), 8E, 10-record frames")
    frame = make_frame(CODEC_8E, 10)
    decode = REGISTRY.decode_frame
    _, packet = decode(frame)
    records = packet.records  # type: ignore[union-attr]
    sample = records[0].io
    serializers: list[tuple[str, Callable[[tuple[Any, ...]], bytes]]] = [
        ("json.dumps + sentinel pre-pass", bag_stdlib),
        ("orjson (contract.io_json)", bag_orjson),
    ]
    if msgspec is not None:
        serializers.append(("msgspec.json", bag_msgspec))
    serializers.append(("hand-rolled bytes %", bag_handrolled))
    reference = json.loads(contract.io_json(sample))
    for label, function in serializers:
        if json.loads(function(sample)) != reference:
            raise SystemExit(f"serializer {label} disagrees with the contract")

    def pipeline(serialize: Callable[[tuple[Any, ...]], bytes] | None) -> Callable[[], None]:
        def run() -> None:
            _, packet = decode(frame)
            for record in packet.records:  # type: ignore[union-attr]
                if serialize is None:
                    contract.entry_fields("352093081452251", "8E", record, 1, "bench")
                else:
                    serialize(record.io)

        return run

    print(f"{'step':<42} {'records/s':>11}")
    decode_only = rate(lambda: decode(frame), seconds) * 10
    print(f"{'decode only':<42} {fmt(decode_only)}")
    full = rate(pipeline(None), seconds) * 10
    print(f"{'decode + entry_fields (as shipped)':<42} {fmt(full)}")
    for label, function in serializers:
        io_only = rate(lambda f=function: [f(r.io) for r in records], seconds) * 10
        print(f"{'io JSON only: ' + label:<42} {fmt(io_only)}")
    for label, function in serializers:
        with_decode = rate(pipeline(function), seconds) * 10
        print(f"{'decode + io JSON: ' + label:<42} {fmt(with_decode)}")


# --- part 3: record instantiation ---------------------------------------------------------


class RecordTuple(NamedTuple):
    timestamp_ms: int
    priority: int
    longitude: float
    latitude: float
    altitude: int
    angle: int
    satellites: int
    speed: int
    event_io_id: int
    io: tuple[Any, ...]
    generation_type: int | None


@attrs.define(slots=True)
class MutableRecord:
    timestamp_ms: int
    priority: int
    longitude: float
    latitude: float
    altitude: int
    angle: int
    satellites: int
    speed: int
    event_io_id: int
    io: tuple[Any, ...]
    generation_type: int | None


def part_records(seconds: float) -> None:
    print()
    print("3. building one record (11 fields), ns per instance")
    args = (1_700_000_000_000, 0, 25.4, -54.6, 120, 90, 9, 50, 0, (), None)
    frame = make_frame(CODEC_8E, 10)
    per_record = 1e9 / (rate(lambda: REGISTRY.decode_frame(frame), seconds) * 10)
    new_tuple = tuple.__new__
    cases = [
        ("attrs frozen, slots (AVLRecord)", lambda: AVLRecord(*args)),
        ("attrs mutable, slots", lambda: MutableRecord(*args)),
        ("typing.NamedTuple", lambda: RecordTuple(*args)),
        ("NamedTuple via tuple.__new__", lambda: new_tuple(RecordTuple, args)),
        ("plain tuple", lambda: tuple(args)),
    ]
    for label, function in cases:
        ns = 1e9 / rate(function, seconds / 2)
        print(f"{label:<34} {ns:>7.0f} ns  ({ns / per_record:>5.1%} of one 8E record's decode)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="time budget per case (default 1.0)"
    )
    parser.add_argument(
        "--part", type=int, choices=(1, 2, 3), action="append", help="run only these parts"
    )
    args = parser.parse_args()
    parts = args.part or [1, 2, 3]
    print(f"Python {sys.version.split()[0]}, one core, {args.seconds:g} s per case\n")
    if 1 in parts:
        part_decode(args.seconds)
    if 2 in parts:
        part_entry(args.seconds)
    if 3 in parts:
        part_records(args.seconds)


if __name__ == "__main__":
    main()
