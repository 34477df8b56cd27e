"""Decode speed: our codecs against the strongest simple decoder, in one run.

Usage::

    python benchmarks/decode.py              # about a minute on one core
    python benchmarks/decode.py --seconds 3  # steadier figures

Part 1 decodes whole TCP frames (envelope, CRC-16/IBM and records) through
``load_codecs().decode_frame`` for codecs 8, 8E and 16, with small (1 record) and large
(10 and 50 record) frames of realistic records: 21 IO elements across the four widths,
plus two NX elements for 8E. The baseline, printed first, is :func:`baseline_decode`: the
simplest correct decoder written with the standard tools at full strength, precompiled
``struct.Struct`` objects, one ``iter_unpack`` per IO group straight into the record's
dict, and fastcrc for the CRC (the C CRC we use). A variant with one ``unpack_from`` per
IO element measured 10-20% slower, and a table-driven CRC in pure Python halves the
rate: neither is the baseline. Its output is checked against ours before anything is
timed.

Part 2 times decode plus turning every record into the stream entry the server publishes
(``teltonika.contract.entry_fields``) against the same baseline plus
:func:`baseline_entry`, the simplest correct encoder of the same fields (``b"%d"`` per
number, ``"%.7f"`` trimmed for degrees, a sentinel pass and orjson for the ``io`` JSON),
checked byte for byte against ours; then it compares serializers for the ``io`` JSON.
Part 3 times building one record in the candidate representations.

Figures are single-core wall-clock rates on a shared machine: compare the ratios printed
in one run, not absolute numbers across runs, and note the load average printed first.
Targets (issue 16): decode >= 1.0x the baseline on every codec and frame size; decode +
entry >= 2x the baseline's decode + entry.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import struct
import sys
import time
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# --- the baseline: the strongest simple decoder, and its entry encoder -------------------

_U32 = struct.Struct(">I")
_NX_HEADER = struct.Struct(">HH")


def _baseline_layout(id_code: str, count_code: str, generation: bool) -> tuple[Any, ...]:
    """Precompiled structs of one codec: record head, group count, one pair per width."""
    head = struct.Struct(">QBiihHBH" + id_code + ("B" if generation else "") + count_code)
    pairs = tuple(struct.Struct(">" + id_code + value) for value in "BHIQ")
    return head, struct.Struct(">" + count_code), pairs, generation


BASELINE_LAYOUTS = {
    CODEC_8: _baseline_layout("B", "B", False),
    CODEC_8E: _baseline_layout("H", "H", False),
    CODEC_16: _baseline_layout("H", "B", True),
}


class BaselineError(Exception):
    pass


def baseline_decode(frame: bytes) -> list[dict[str, Any]]:
    """Decode a TCP AVL frame the straightforward way, with the fast standard tools."""
    if len(frame) < 12 or frame[:4] != b"\x00\x00\x00\x00":
        raise BaselineError("envelope")
    (length,) = _U32.unpack_from(frame, 4)
    if length + 12 != len(frame):
        raise BaselineError("length")
    end = 8 + length
    if crc16(frame[8:end]) != _U32.unpack_from(frame, end)[0]:
        raise BaselineError("crc")
    codec_id, count = frame[8], frame[9]
    if codec_id not in BASELINE_LAYOUTS:
        raise BaselineError("codec")
    head, group_count, pairs, generation = BASELINE_LAYOUTS[codec_id]
    offset = 10
    records = []
    try:
        for _ in range(count):
            fields = head.unpack_from(frame, offset)
            offset += head.size
            io: dict[int, int | bytes] = {}
            seen = 0
            for pair in pairs:
                (n,) = group_count.unpack_from(frame, offset)
                offset += group_count.size
                stop = offset + n * pair.size
                if stop > end:
                    raise BaselineError("group")
                io.update(pair.iter_unpack(frame[offset:stop]))
                offset = stop
                seen += n
            if codec_id == CODEC_8E:
                (n,) = group_count.unpack_from(frame, offset)
                offset += 2
                for _ in range(n):
                    io_id, size = _NX_HEADER.unpack_from(frame, offset)
                    offset += 4
                    if offset + size > end:
                        raise BaselineError("nx")
                    io[io_id] = frame[offset : offset + size]
                    offset += size
                seen += n
            if seen != fields[-1] or offset > end - 1:
                raise BaselineError("io")
            records.append(
                {
                    "timestamp_ms": fields[0],
                    "priority": fields[1],
                    "longitude": fields[2] / 1e7,
                    "latitude": fields[3] / 1e7,
                    "altitude": fields[4],
                    "angle": fields[5],
                    "satellites": fields[6],
                    "speed": fields[7],
                    "event_io_id": fields[8],
                    "generation_type": fields[9] if generation else None,
                    "io": io,
                }
            )
    except struct.error:
        raise BaselineError("truncated") from None
    if offset != end - 1 or frame[end - 1] != count:
        raise BaselineError("count")
    return records


def baseline_degrees(value: float) -> bytes:
    """Seven decimals without trailing zeros: exact for a device's i32 / 10^7."""
    text = (b"%.7f" % value).rstrip(b"0").rstrip(b".")
    return b"0" if text == b"-0" else text


def baseline_entry(
    imei: str, codec_name: str, record: dict[str, Any], received_at_ms: int, instance_id: str
) -> list[bytes]:
    """The contract's flat ``field, value ...`` list, written the simplest correct way."""
    io: dict[int, object] = {}
    for io_id, value in record["io"].items():
        if isinstance(value, bytes):
            io[io_id] = {"__buffer_b64": b64encode(value).decode("ascii")}
        elif value > contract.MAX_SAFE_INTEGER:
            io[io_id] = {"__bigint": str(value)}
        else:
            io[io_id] = value
    generation = record["generation_type"]
    # fmt: off
    return [
        b"v", b"1",
        b"imei", imei.encode("ascii"),
        b"codec", codec_name.encode("ascii"),
        b"timestamp_ms", b"%d" % record["timestamp_ms"],
        b"received_at_ms", b"%d" % received_at_ms,
        b"latitude", baseline_degrees(record["latitude"]),
        b"longitude", baseline_degrees(record["longitude"]),
        b"altitude", b"%d" % record["altitude"],
        b"angle", b"%d" % record["angle"],
        b"speed", b"%d" % record["speed"],
        b"satellites", b"%d" % record["satellites"],
        b"priority", b"%d" % record["priority"],
        b"event_io_id", b"%d" % record["event_io_id"],
        b"generation_type", b"" if generation is None else b"%d" % generation,
        b"instance_id", instance_id.encode("utf-8"),
        b"io", orjson.dumps(io, option=orjson.OPT_NON_STR_KEYS),
    ]
    # fmt: on


IMEI = "352093081452251"


def ours_as_dicts(frame: bytes) -> list[dict[str, Any]]:
    _codec, packet = REGISTRY.decode_frame(frame)
    return [
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


def check_baseline_agrees(frame: bytes) -> None:
    """Refuse to time a baseline that does not decode and encode what we do."""
    if baseline_decode(frame) != ours_as_dicts(frame):
        raise SystemExit("baseline and teltonika decoders disagree: benchmark invalid")
    codec, packet = REGISTRY.decode_frame(frame)
    theirs = [baseline_entry(IMEI, codec.name, r, 1, "bench") for r in baseline_decode(frame)]
    ours = [contract.entry_fields(IMEI, codec.name, r, 1, "bench") for r in packet.records]  # type: ignore[union-attr]
    if theirs != ours:
        raise SystemExit("baseline and teltonika entries differ: benchmark invalid")


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

CODECS = ((CODEC_8, "8"), (CODEC_8E, "8E"), (CODEC_16, "16"))


def part_decode(seconds: float) -> None:
    print("1. decode_frame (envelope + CRC + records), records/s")
    print(
        f"{'codec':>5} {'recs':>4} {'bytes':>6} | {'baseline struct+fastcrc':>23} |"
        f" {'teltonika':>11} {'frames/s':>9} | {'ratio':>6}"
    )
    decode = REGISTRY.decode_frame
    for codec_id, name in CODECS:
        for count in (1, 10, 50):
            frame = make_frame(codec_id, count)
            check_baseline_agrees(frame)
            base = rate(lambda f=frame: baseline_decode(f), seconds)
            ours = rate(lambda f=frame: decode(f), seconds)
            print(
                f"{name:>5} {count:>4} {len(frame):>6} | {fmt(base * count):>23} |"
                f" {fmt(ours * count)} {ours:>9,.0f} | {ours / base:>5.2f}x"
            )


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
    print("2. decode + stream entry (teltonika.contract.entry_fields), 10-record frames, records/s")
    print(f"{'codec':>5} | {'baseline + its entry':>20} | {'teltonika':>11} | {'ratio':>6}")
    decode = REGISTRY.decode_frame
    entry_fields = contract.entry_fields
    for codec_id, name in CODECS:
        frame = make_frame(codec_id, 10)
        check_baseline_agrees(frame)

        def theirs(f: bytes = frame, n: str = name) -> None:
            for record in baseline_decode(f):
                baseline_entry(IMEI, n, record, 1, "bench")

        def ours(f: bytes = frame, n: str = name) -> None:
            for record in decode(f)[1].records:  # type: ignore[union-attr]
                entry_fields(IMEI, n, record, 1, "bench")

        base = rate(theirs, seconds) * 10
        full = rate(ours, seconds) * 10
        print(f"{name:>5} | {fmt(base):>20} | {fmt(full)} | {full / base:>5.2f}x")

    print()
    print("   the io JSON of 8E records alone, by serializer (records/s)")
    frame = make_frame(CODEC_8E, 10)
    records = decode(frame)[1].records  # type: ignore[union-attr]
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
        io_only = rate(lambda f=function: [f(r.io) for r in records], seconds) * 10
        print(f"   {label:<39} {fmt(io_only)}")


# --- part 3: record instantiation ---------------------------------------------------------


@attrs.frozen(slots=True)
class FrozenRecord:
    """The previous ``AVLRecord``: a frozen, slotted attrs class."""

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
        ("AVLRecord via tuple.__new__ (decoder)", lambda: new_tuple(AVLRecord, args)),
        ("AVLRecord(...) (NamedTuple __new__)", lambda: AVLRecord(*args)),
        ("attrs frozen, slots (previous)", lambda: FrozenRecord(*args)),
        ("plain tuple", lambda: tuple(args)),
    ]
    for label, function in cases:
        ns = 1e9 / rate(function, seconds / 2)
        print(f"{label:<38} {ns:>7.0f} ns  ({ns / per_record:>5.1%} of one 8E record's decode)")


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
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"Python {sys.version.split()[0]}, one core, {args.seconds:g} s per case, load {load}\n")
    if 1 in parts:
        part_decode(args.seconds)
    if 2 in parts:
        part_entry(args.seconds)
    if 3 in parts:
        part_records(args.seconds)


if __name__ == "__main__":
    main()
