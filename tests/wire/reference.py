"""A reference AVL decoder: the format read one field at a time, for comparison only.

:func:`teltonika.wire.avl.decode_avl` is tuned for speed (precompiled structs, a cache of
IO layouts, records built without ``__init__``). This module is what it must agree with:
the layout as README's record tables and the codec table describe it, read front to back
with ``int.from_bytes``, and every structural rule checked where it applies. It is slow
and has no cache, on purpose; property tests in ``test_decode_reference.py`` compare the
two on random and damaged bodies.
"""

from __future__ import annotations

from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    NX,
    AVLPacket,
    AVLRecord,
    IOElement,
)


class ReferenceError(Exception):
    """The reference decoder refuses the body."""


class _Reader:
    """Reads big-endian fields from ``data[position:end]`` and refuses to read past *end*."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data = data
        self.position = start
        self.end = end

    def take(self, size: int) -> bytes:
        if self.position + size > self.end:
            raise ReferenceError(f"{size} bytes wanted, {self.end - self.position} remain")
        chunk = self.data[self.position : self.position + size]
        self.position += size
        return chunk

    def unsigned(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def signed(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big", signed=True)


# codec id: (IO id size, IO count size, has generation type, has NX group)
_CODECS = {
    CODEC_8: (1, 1, False, False),
    CODEC_8E: (2, 2, False, True),
    CODEC_16: (2, 1, True, False),
}


def reference_decode_avl(data: bytes, start: int, end: int) -> AVLPacket:
    """Decode the AVL body ``data[start:end]`` (codec id through Number of Data 2).

    :raise ReferenceError: anything the format does not allow.
    """
    if end > len(data) or end - start < 3:
        raise ReferenceError("body too short")
    reader = _Reader(data, start, end - 1)  # the last byte is Number of Data 2
    codec_id = reader.unsigned(1)
    if codec_id not in _CODECS:
        raise ReferenceError("not an AVL codec")
    id_size, count_size, has_generation, has_nx = _CODECS[codec_id]
    count = reader.unsigned(1)
    if count == 0 or data[end - 1] != count:
        raise ReferenceError("record counts")
    records = []
    for _ in range(count):
        timestamp_ms = reader.unsigned(8)
        priority = reader.unsigned(1)
        longitude = reader.signed(4) / 10_000_000
        latitude = reader.signed(4) / 10_000_000
        altitude = reader.signed(2)
        angle = reader.unsigned(2)
        satellites = reader.unsigned(1)
        speed = reader.unsigned(2)
        event_io_id = reader.unsigned(id_size)
        generation_type = reader.unsigned(1) if has_generation else None
        total = reader.unsigned(count_size)
        io: list[IOElement] = []
        for width in (1, 2, 4, 8):
            for _ in range(reader.unsigned(count_size)):
                io_id = reader.unsigned(id_size)
                io.append((io_id, width, reader.unsigned(width)))
        if has_nx:
            for _ in range(reader.unsigned(2)):
                io_id = reader.unsigned(2)
                io.append((io_id, NX, reader.take(reader.unsigned(2))))
        if len(io) != total:
            raise ReferenceError("total IO count")
        records.append(
            AVLRecord(
                timestamp_ms=timestamp_ms,
                priority=priority,
                longitude=longitude,
                latitude=latitude,
                altitude=altitude,
                angle=angle,
                satellites=satellites,
                speed=speed,
                event_io_id=event_io_id,
                io=tuple(io),
                generation_type=generation_type,
            )
        )
    if reader.position != end - 1:
        raise ReferenceError("trailing bytes")
    return AVLPacket(codec_id, tuple(records))
