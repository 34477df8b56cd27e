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

Speed (``benchmarks/decode.py``): a record's fixed part is read with one precompiled
``struct.Struct`` call, and its four fixed-width IO groups with one more: the group counts
are read first, and the struct for that combination of counts (a :class:`_Shape`) comes
from a cache, compiled on a miss. The cache is bounded by the IO elements its shapes
describe (:data:`SHAPE_BUDGET`, oldest dropped first, at most about half a megabyte per
codec), so frames with ever new group sizes only cost compile time, never memory; records
with more than :data:`SHAPE_MAX_ELEMENTS` fixed-width elements are read group by group.
Records are built with ``tuple.__new__``; nothing runs per IO element in Python except
for NX elements.

Safety: every read is bounds-checked against the body's end (not the buffer's, which
also holds the CRC), and counts are checked against the bytes that remain *before* any
allocation, so no input can make the decoder allocate more than the frame's own size.
Only :class:`~teltonika.wire.errors.DecodeError` escapes.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Sequence
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
_NX_HEADER: Final = struct.Struct(">HH")
_WIDTH_CODES: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}
_WIDTHS: Final = (1, 2, 4, 8)
_SCALE: Final = 10_000_000

SHAPE_BUDGET: Final = 4096
"""IO elements the compiled shapes of one codec may describe together (measured at most
about 0.5 MB): the oldest shapes are dropped beyond it, so no input grows the cache."""

SHAPE_MAX_ELEMENTS: Final = 255
"""Records with more fixed-width IO elements than this are read group by group instead."""

_new_record: Callable[[type[AVLRecord], Iterable[object]], AVLRecord] = tuple.__new__
_new_packet: Callable[[type[AVLPacket], Iterable[object]], AVLPacket] = tuple.__new__
"""``AVLRecord``'s or ``AVLPacket``'s fields straight into the tuple, without the Python
``__new__`` that ``NamedTuple`` generates (a third of the cost of building a record)."""


class _Shape:
    """The fixed-width IO groups of a record with given group counts, compiled.

    ``struct`` reads the four groups in one call, skipping the counts (pad bytes: they
    were read to find this shape), so it returns ``id, value, id, value ...``; ``widths``
    holds each element's width. ``zip(items, widths, items)`` over one iterator then
    builds the ``(io_id, width, value)`` triples in C: zip takes its arguments left to
    right, and stops when ``items`` runs out at the start of a round (never in the middle:
    the struct returns exactly two items per width).
    """

    __slots__ = ("struct", "widths")

    def __init__(self, layout: _Layout, counts: tuple[int, int, int, int]) -> None:
        skip = f"{layout.count_size}x"
        codes = [">"]
        widths: list[int] = []
        for width, count in zip(_WIDTHS, counts, strict=True):
            codes.append(skip + (layout.id_code + _WIDTH_CODES[width]) * count)
            widths += [width] * count
        self.struct = struct.Struct("".join(codes))
        self.widths = tuple(widths)


class _Layout:
    """Field sizes of one AVL codec's IO element, and the precompiled structs to read it.

    ``head`` reads a record's fixed part in one call: the GPS element, event IO id,
    generation type (codec 16), total IO count and the count of the 1-byte group.
    ``pairs`` has one ``(width, struct, item size)`` per fixed-width group for the
    group-by-group walk; ``shapes`` holds the compiled :class:`_Shape` of recently seen
    group counts, oldest first.
    """

    __slots__ = (
        "cached_elements",
        "codec_id",
        "count_code",
        "count_size",
        "generation",
        "head",
        "hot",
        "id_code",
        "id_size",
        "items",
        "lock",
        "min_record",
        "nx",
        "pairs",
        "shapes",
    )

    def __init__(self, codec_id: int, id_size: int, count_size: int, generation: bool, nx: bool):
        self.codec_id = codec_id
        self.id_size = id_size
        self.id_code = _WIDTH_CODES[id_size]
        self.count_size = count_size
        self.count_code = _WIDTH_CODES[count_size]
        self.generation = generation
        self.nx = nx
        # ... event id, [generation type], total IO count, count of the 1-byte group
        self.head = struct.Struct(
            ">QBiihHBH" + self.id_code + ("B" if generation else "") + self.count_code * 2
        )
        self.pairs = tuple(
            (width, struct.Struct(">" + self.id_code + _WIDTH_CODES[width]), id_size + width)
            for width in _WIDTHS
        )
        self.items = tuple(id_size + width for width in _WIDTHS)
        # GPS + event id + [generation] + total + 4 (or 5) group counts
        groups = 5 if nx else 4
        self.min_record = _GPS_SIZE + id_size + int(generation) + count_size * (1 + groups)
        self.shapes: dict[tuple[int, int, int, int], _Shape] = {}
        self.cached_elements = 0
        self.lock = threading.Lock()
        item1, item2, item4, item8 = self.items
        self.hot = (
            self.head.unpack_from,
            self.head.size,
            self.head.size - count_size,
            count_size,
            item1,
            item2,
            item4,
            item8,
            count_size == 2,
            generation,
            nx,
            self.shapes,
        )
        """What the record loop needs, in the order it unpacks them into locals."""

    def shape(self, counts: tuple[int, int, int, int]) -> _Shape | None:
        """Compile the shape for *counts* and cache it, dropping the oldest beyond budget.

        None for a record with more than :data:`SHAPE_MAX_ELEMENTS`: it is walked group
        by group, as compiling it would cost more than it saves. Only this (a cache miss)
        takes the lock: the decoder's lookups are single dict reads, safe in any thread.
        """
        if sum(counts) > SHAPE_MAX_ELEMENTS:
            return None
        shape = _Shape(self, counts)
        with self.lock:
            if counts not in self.shapes:
                self.shapes[counts] = shape
                self.cached_elements += len(shape.widths)
            while self.cached_elements > SHAPE_BUDGET:
                oldest = next(iter(self.shapes))
                self.cached_elements -= len(self.shapes.pop(oldest).widths)
        return shape


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
    """Check the body's envelope fields, then walk its records (the hot loop).

    One struct call reads a record's fixed part, one more its four fixed-width IO groups
    through the compiled shape of their counts; the counts are read first, each only if
    it lies before *last*. Locals only, no call per IO element.
    """
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
    (
        unpack_head,
        head_size,
        to_groups,
        first_group,
        item1,
        item2,
        item4,
        item8,
        two_byte_counts,
        generation_type,
        has_nx,
        shapes,
    ) = layout.hot
    nx_header = _NX_HEADER.unpack_from
    records = []
    offset = start + 2
    for _ in range(count):
        record_start = offset
        if offset + head_size > last:
            raise TruncatedError("record GPS element or IO header is truncated", offset)
        if generation_type:
            ts, priority, lon, lat, alt, angle, sats, speed, event_id, generation, total, n1 = (
                unpack_head(data, offset)
            )
        else:
            ts, priority, lon, lat, alt, angle, sats, speed, event_id, total, n1 = unpack_head(
                data, offset
            )
            generation = None
        # *offset* moves to the first group's count (which the head struct read too). The
        # other three counts are read next, to find the compiled shape. A read at or past
        # *last* leaves *end_io* past *last* (it grows by at least one count per read), and
        # one past the buffer raises IndexError: either way the group-by-group walk then
        # names what is missing.
        offset += to_groups
        end_io = offset + first_group + n1 * item1
        try:
            if two_byte_counts:
                n2 = (data[end_io] << 8) | data[end_io + 1]
                end_io += 2 + n2 * item2
                n4 = (data[end_io] << 8) | data[end_io + 1]
                end_io += 2 + n4 * item4
                n8 = (data[end_io] << 8) | data[end_io + 1]
                end_io += 2 + n8 * item8
            else:
                n2 = data[end_io]
                end_io += 1 + n2 * item2
                n4 = data[end_io]
                end_io += 1 + n4 * item4
                n8 = data[end_io]
                end_io += 1 + n8 * item8
        except IndexError:
            end_io = last + 1
        shape = None
        if end_io <= last:
            counts = (n1, n2, n4, n8)
            shape = shapes.get(counts) or layout.shape(counts)
        if shape is None:
            io, offset = _walk_fixed_groups(data, offset, last, layout)
        else:
            items = iter(shape.struct.unpack_from(data, offset))
            # zip() with a keyword argument takes CPython's slow call path (+12% here).
            io = tuple(zip(items, shape.widths, items))  # noqa: B905 (see _Shape)
            offset = end_io
        if has_nx:
            if offset + 2 > last:
                raise TruncatedError("NX IO count is truncated", offset)
            n = (data[offset] << 8) | data[offset + 1]
            offset += 2
            if n:  # rare in practice: a plain loop
                if offset + n * 4 > last:
                    raise TruncatedError(f"{n} NX IO elements cannot fit in the record", offset - 2)
                nx: list[IOElement] = []
                try:
                    for _ in range(n):
                        io_id, size = nx_header(data, offset)
                        offset += 4
                        stop = offset + size
                        if stop > last:  # the header itself, or its value, runs past
                            raise _nx_truncated(io_id, size, offset, last)
                        nx.append((io_id, NX, data[offset:stop]))
                        offset = stop
                except struct.error:  # a header past the buffer's end
                    raise _nx_truncated(0, 0, offset + 4, last) from None
                io += tuple(nx)
        seen = len(io)
        if seen != total:
            raise FieldValueError(
                f"total IO count {total} differs from the {seen} elements in its groups",
                record_start,
            )
        records.append(
            _new_record(
                AVLRecord,
                (
                    ts,
                    priority,
                    lon / 10_000_000,  # _SCALE, without a global lookup
                    lat / 10_000_000,
                    alt,
                    angle,
                    sats,
                    speed,
                    event_id,
                    io,
                    generation,
                ),
            )
        )
    if offset != last:
        raise TrailingBytesError(
            f"{last - offset} bytes left between the last record and Number of Data 2", offset
        )
    return _new_packet(AVLPacket, (codec_id, tuple(records)))


def _nx_truncated(io_id: int, size: int, value_start: int, end: int) -> TruncatedError:
    """The error for an NX element whose header (before *value_start*) or value runs
    past *end*."""
    if value_start > end:
        return TruncatedError("NX IO element header is truncated", value_start - 4)
    return TruncatedError(
        f"NX IO element {io_id} declares {size} bytes, {end - value_start} remain", value_start
    )


def _walk_fixed_groups(
    data: bytes, offset: int, end: int, layout: _Layout
) -> tuple[tuple[IOElement, ...], int]:
    """Read the four fixed-width IO groups one at a time, each checked against *end*.

    The path for records too large for a compiled shape, and the one that names the
    group whose count runs past the record.
    """
    io: list[IOElement] = []
    count_size = layout.count_size
    for width, pair, item in layout.pairs:
        if offset + count_size > end:
            raise TruncatedError(f"{width}-byte IO count is truncated", offset)
        n = int.from_bytes(data[offset : offset + count_size], "big")
        offset += count_size
        stop = offset + n * item
        if stop > end:
            raise TruncatedError(
                f"{n} IO elements of {width} bytes need {n * item} bytes, "
                f"{max(end - offset, 0)} remain",
                offset,
            )
        io += [(io_id, width, value) for io_id, value in pair.iter_unpack(data[offset:stop])]
        offset = stop
    return tuple(io), offset


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
