"""Decode and encode the AVL data codecs: 8, 8 Extended (0x8E) and 16 (0x10).

The three codecs share the record's first 24 bytes (timestamp, priority, longitude,
latitude, altitude, angle, satellites, speed) and differ in the IO element
(docs/protocol.rst, section 'AVL record'):

========  =========  ===========  ================  =============
codec     IO ids     IO counts    generation type   NX group
========  =========  ===========  ================  =============
8         1 byte     1 byte       no                no
8E        2 bytes    2 bytes      no                yes
16        2 bytes    1 byte       yes (1 byte)      no
========  =========  ===========  ================  =============

Speed: a record's fixed part is read with one precompiled ``struct.Struct`` call and each
fixed-width IO group with one ``iter_unpack`` of a per-codec pair struct (measured in
``benchmarks/decode.py``). No struct is built from input-dependent sizes: an earlier
cache keyed by group size let a hostile peer pin megabytes with frames of ever new sizes.

Safety: every read is bounds-checked against the body's end (not the buffer's, which
also holds the CRC), and counts are checked against the bytes that remain *before* any
allocation, so no input can make the decoder allocate more than the frame's own size.
Only :class:`~teltonika.wire.errors.DecodeError` escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from teltonika.wire.errors import (
    DecodeError,
    FieldValueError,
    RecordCountError,
    TrailingBytesError,
    TruncatedError,
)
from teltonika.wire.records import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    NX,
    AVLPacket,
    AVLRecord,
    IOElement,
)

_GPS: Final = struct.Struct(">QBiihHBH")
_GPS_SIZE: Final = _GPS.size  # 24
_WIDTH_CODES: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}
_WIDTHS: Final = (1, 2, 4, 8)
_SCALE: Final = 10_000_000


class _Layout:
    """Field sizes of one AVL codec's IO element, and the precompiled structs to read it.

    ``head`` reads a record's fixed part in one call: the GPS element, event IO id,
    generation type (codec 16) and total IO count. ``pairs`` has one ``(width, struct,
    item size)`` per fixed-width group; its struct reads one ``(io_id, value)`` pair.
    """

    __slots__ = (
        "codec_id",
        "count_size",
        "generation",
        "head",
        "id_code",
        "id_size",
        "min_record",
        "nx",
        "pairs",
    )

    def __init__(self, codec_id: int, id_size: int, count_size: int, generation: bool, nx: bool):
        self.codec_id = codec_id
        self.id_size = id_size
        self.id_code = _WIDTH_CODES[id_size]
        self.count_size = count_size
        self.generation = generation
        self.nx = nx
        self.head = struct.Struct(
            ">QBiihHBH" + self.id_code + ("B" if generation else "") + _WIDTH_CODES[count_size]
        )
        self.pairs = tuple(
            (width, struct.Struct(">" + self.id_code + _WIDTH_CODES[width]), id_size + width)
            for width in _WIDTHS
        )
        # GPS + event id + [generation] + total + 4 (or 5) group counts
        groups = 5 if nx else 4
        self.min_record = _GPS_SIZE + id_size + int(generation) + count_size * (1 + groups)


LAYOUTS: Final[dict[int, _Layout]] = {
    CODEC_8: _Layout(CODEC_8, id_size=1, count_size=1, generation=False, nx=False),
    CODEC_8E: _Layout(CODEC_8E, id_size=2, count_size=2, generation=False, nx=True),
    CODEC_16: _Layout(CODEC_16, id_size=2, count_size=1, generation=True, nx=False),
}


def decode_avl(data: bytes, start: int, end: int) -> AVLPacket:
    """Decode an AVL body ``data[start:end]`` (codec id through Number of Data 2).

    Offsets in error messages are offsets into *data*.

    :raise DecodeError: any structural problem; nothing else escapes.
    """
    try:
        return _decode(data, start, end)
    except DecodeError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as error:  # pragma: no cover
        # Defence in depth: the explicit checks above should make this unreachable.
        raise DecodeError(f"malformed AVL body: {error}", start) from None


def _decode(data: bytes, start: int, end: int) -> AVLPacket:
    if end - start < 3 or end > len(data):
        raise TruncatedError(f"AVL body of {end - start} bytes is too short", start)
    codec_id = data[start]
    layout = LAYOUTS.get(codec_id)
    if layout is None:
        raise FieldValueError(f"codec id 0x{codec_id:02X} is not an AVL codec", start)
    count = data[start + 1]
    if count == 0:
        raise RecordCountError("Number of Data 1 is zero", start + 1)
    last = end - 1
    trailer = data[last]
    if trailer != count:
        raise RecordCountError(
            f"Number of Data 1 ({count}) differs from Number of Data 2 ({trailer})", last
        )
    if (last - start - 2) < count * layout.min_record:
        raise TruncatedError(
            f"{count} records need at least {count * layout.min_record} bytes, "
            f"{last - start - 2} remain",
            start + 2,
        )
    records, offset = _decode_records(data, start + 2, last, count, layout)
    if offset != last:
        raise TrailingBytesError(
            f"{last - offset} bytes left between the last record and Number of Data 2", offset
        )
    return AVLPacket(codec_id, records)


def _decode_records(
    data: bytes, offset: int, end: int, count: int, layout: _Layout
) -> tuple[tuple[AVLRecord, ...], int]:
    """Walk *count* records from *offset*; every read is checked against *end*.

    This is the hot loop (benchmarks/decode.py): one struct call for a record's fixed
    part, one per IO group (``iter_unpack`` over the group's bytes), locals only. The
    structs are precompiled per codec, so no input can grow a cache.
    """
    head = layout.head
    head_size = head.size
    pairs = layout.pairs
    two_byte_counts = layout.count_size == 2
    count_size = layout.count_size
    generation_type = layout.generation
    has_nx = layout.nx
    records = []
    for _ in range(count):
        record_start = offset
        if offset + head_size > end:
            raise TruncatedError("record GPS element or IO header is truncated", offset)
        if generation_type:
            ts, priority, lon, lat, alt, angle, sats, speed, event_id, generation, total = (
                head.unpack_from(data, offset)
            )
        else:
            ts, priority, lon, lat, alt, angle, sats, speed, event_id, total = head.unpack_from(
                data, offset
            )
            generation = None
        offset += head_size
        io: list[IOElement] = []
        seen = 0
        for width, pair, item in pairs:
            if offset + count_size > end:
                raise TruncatedError(f"{width}-byte IO count is truncated", offset)
            n = (data[offset] << 8) | data[offset + 1] if two_byte_counts else data[offset]
            offset += count_size
            if n:
                stop = offset + n * item
                if stop > end:
                    raise TruncatedError(
                        f"{n} IO elements of {width} bytes need {n * item} bytes, "
                        f"{max(end - offset, 0)} remain",
                        offset,
                    )
                if n == 1:
                    io_id, value = pair.unpack_from(data, offset)
                    io.append((io_id, width, value))
                else:
                    io += [(i, width, v) for i, v in pair.iter_unpack(data[offset:stop])]
                offset = stop
                seen += n
        if has_nx:
            if offset + 2 > end:
                raise TruncatedError("NX IO count is truncated", offset)
            n = (data[offset] << 8) | data[offset + 1]
            offset += 2
            if offset + n * 4 > end:
                raise TruncatedError(f"{n} NX IO elements cannot fit in the record", offset)
            for _ in range(n):
                if offset + 4 > end:
                    raise TruncatedError("NX IO element header is truncated", offset)
                io_id = (data[offset] << 8) | data[offset + 1]
                size = (data[offset + 2] << 8) | data[offset + 3]
                offset += 4
                if offset + size > end:
                    raise TruncatedError(
                        f"NX IO element {io_id} declares {size} bytes, {end - offset} remain",
                        offset,
                    )
                io.append((io_id, NX, bytes(data[offset : offset + size])))
                offset += size
            seen += n
        if seen != total:
            raise FieldValueError(
                f"total IO count {total} differs from the {seen} elements in its groups",
                record_start,
            )
        records.append(
            AVLRecord(
                ts,
                priority,
                lon / _SCALE,
                lat / _SCALE,
                alt,
                angle,
                sats,
                speed,
                event_id,
                tuple(io),
                generation,
            )
        )
    return tuple(records), offset


def _degrees_to_int(value: float) -> int:
    return round(value * _SCALE)


def encode_avl(codec_id: int, records: Sequence[AVLRecord]) -> bytes:
    """Encode *records* as an AVL body (codec id through Number of Data 2).

    IO elements are grouped by width in the order given; NX elements are only allowed in
    codec 8 Extended. Wrap the result with :func:`teltonika.wire.frames.wrap` for TCP.

    :raise ValueError: a record or IO element that does not fit the codec.
    """
    layout = LAYOUTS.get(codec_id)
    if layout is None:
        raise ValueError(f"codec id 0x{codec_id:02X} is not an AVL codec")
    if not 1 <= len(records) <= 255:
        raise ValueError(f"an AVL frame carries 1 to 255 records, not {len(records)}")
    id_size, count_size = layout.id_size, layout.count_size
    parts = [bytes((codec_id, len(records)))]
    for record in records:
        parts.append(
            _GPS.pack(
                record.timestamp_ms,
                record.priority,
                _degrees_to_int(record.longitude),
                _degrees_to_int(record.latitude),
                record.altitude,
                record.angle,
                record.satellites,
                record.speed,
            )
        )
        parts.append(record.event_io_id.to_bytes(id_size, "big"))
        if layout.generation:
            parts.append((record.generation_type or 0).to_bytes(1, "big"))
        groups: dict[int, list[IOElement]] = {1: [], 2: [], 4: [], 8: [], NX: []}
        for element in record.io:
            width = element[1]
            if width not in groups or (width == NX and not layout.nx):
                raise ValueError(f"IO element {element[0]} has width {width} not in this codec")
            groups[width].append(element)
        parts.append(len(record.io).to_bytes(count_size, "big"))
        for width in _WIDTHS:
            group = groups[width]
            parts.append(len(group).to_bytes(count_size, "big"))
            for io_id, _, value in group:
                if not isinstance(value, int):
                    raise ValueError(f"IO element {io_id} of width {width} needs an int value")
                parts.append(io_id.to_bytes(id_size, "big") + value.to_bytes(width, "big"))
        if layout.nx:
            group = groups[NX]
            parts.append(len(group).to_bytes(2, "big"))
            for io_id, _, value in group:
                if not isinstance(value, bytes):
                    raise ValueError(f"NX IO element {io_id} needs a bytes value")
                parts.append(io_id.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value)
    parts.append(bytes((len(records),)))
    return b"".join(parts)
