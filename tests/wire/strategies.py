"""Hypothesis strategies for wire values, within the ranges the formats can carry.

Coordinates are drawn as the device's signed i32 of degrees x 10^7 and turned into
degrees (``int / 1e7``), so an encode/decode round trip must give back the same float.
IO elements use widths 1/2/4/8 with unsigned values of that width and ids that fit the
codec's id size; NX elements (raw bytes) only for codec 8 Extended.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import strategies as st

from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    CODEC_12,
    CODEC_13,
    CODEC_14,
    CODEC_16,
    KEEPALIVE,
    NX,
    AVLRecord,
    DataFrame,
    Frame,
    ImeiFrame,
    IOElement,
    encode_avl_frame,
    encode_login,
    encode_message,
    wrap,
)

AVL_CODECS = (CODEC_8, CODEC_8E, CODEC_16)
ID_BITS = {CODEC_8: 8, CODEC_8E: 16, CODEC_16: 16}
WIDTH_ORDER = {1: 0, 2: 1, 4: 2, 8: 3, NX: 4}

i32 = st.integers(-(2**31), 2**31 - 1)
degrees = i32.map(lambda value: value / 10_000_000)
imeis = st.text("0123456789", min_size=15, max_size=15)


def io_elements(codec_id: int, max_size: int = 12) -> st.SearchStrategy[list[IOElement]]:
    """IO elements in any order (the encoder groups them by width)."""
    ids = st.integers(0, 2 ** ID_BITS[codec_id] - 1)
    fixed = st.sampled_from((1, 2, 4, 8)).flatmap(
        lambda width: st.tuples(ids, st.just(width), st.integers(0, 2 ** (8 * width) - 1))
    )
    element: st.SearchStrategy[Any] = fixed
    if codec_id == CODEC_8E:
        nx = st.tuples(ids, st.just(NX), st.binary(max_size=40))
        element = st.one_of(fixed, nx)
    return st.lists(element, max_size=max_size)


@st.composite
def avl_records(draw: st.DrawFn, codec_id: int) -> AVLRecord:
    """One record that codec *codec_id* can carry."""
    return AVLRecord(
        timestamp_ms=draw(st.integers(0, 2**64 - 1)),
        priority=draw(st.integers(0, 255)),
        longitude=draw(degrees),
        latitude=draw(degrees),
        altitude=draw(st.integers(-(2**15), 2**15 - 1)),
        angle=draw(st.integers(0, 2**16 - 1)),
        satellites=draw(st.integers(0, 255)),
        speed=draw(st.integers(0, 2**16 - 1)),
        event_io_id=draw(st.integers(0, 2 ** ID_BITS[codec_id] - 1)),
        io=tuple(draw(io_elements(codec_id))),
        generation_type=draw(st.integers(0, 255)) if codec_id == CODEC_16 else None,
    )


def grouped(record: AVLRecord) -> AVLRecord:
    """The record as a decoder returns it: IO elements grouped by width, stable within."""
    io = tuple(sorted(record.io, key=lambda element: WIDTH_ORDER[element[1]]))
    return AVLRecord(
        record.timestamp_ms,
        record.priority,
        record.longitude,
        record.latitude,
        record.altitude,
        record.angle,
        record.satellites,
        record.speed,
        record.event_io_id,
        io,
        record.generation_type,
    )


@st.composite
def avl_batches(
    draw: st.DrawFn, codecs: tuple[int, ...] = AVL_CODECS, max_records: int = 4
) -> tuple[int, list[AVLRecord]]:
    """A codec id and 1..max_records records for it."""
    codec_id = draw(st.sampled_from(codecs))
    records = draw(st.lists(avl_records(codec_id), min_size=1, max_size=max_records))
    return codec_id, records


@st.composite
def message_bodies(draw: st.DrawFn) -> bytes:
    """A valid codec 12/13/14 body of any type (commands, responses, nACKs)."""
    codec_id = draw(st.sampled_from((CODEC_12, CODEC_13, CODEC_14)))
    payload = draw(st.binary(max_size=64))
    message_type = draw(st.sampled_from((0x05, 0x06, 0x11)))
    if codec_id == CODEC_14:
        return encode_message(codec_id, payload, message_type, imei=draw(imeis))
    if codec_id == CODEC_13:
        seconds = draw(st.integers(0x10000000, 2**32 - 1))
        return encode_message(codec_id, payload, message_type, timestamp_ms=seconds * 1000)
    return encode_message(codec_id, payload, message_type)


@st.composite
def valid_data_frames(draw: st.DrawFn) -> bytes:
    """A complete, valid TCP data frame: AVL or message."""
    if draw(st.booleans()):
        codec_id, records = draw(avl_batches(max_records=3))
        return encode_avl_frame(codec_id, records)
    return wrap(draw(message_bodies()))


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[Frame]]:
    """A device's TCP byte stream (keepalives, a login, data frames) and its frames."""
    frames: list[Frame] = []
    chunks: list[bytes] = []
    for _ in range(draw(st.integers(0, 2))):
        frames.append(KEEPALIVE)
        chunks.append(b"\xff")
    login = encode_login(draw(imeis))
    frames.append(ImeiFrame(login[2:]))
    chunks.append(login)
    items = st.one_of(valid_data_frames(), st.just(b"\xff"))
    for item in draw(st.lists(items, max_size=5)):
        chunks.append(item)
        frames.append(KEEPALIVE if item == b"\xff" else DataFrame(item))
    return b"".join(chunks), frames


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """*data* split at arbitrary points (empty reads included)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """*data* with one to three kinds of damage."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["flip", "truncate", "insert", "delete", "byte", "length", "count"])
        )
        if not buf:
            buf.extend(draw(st.binary(min_size=1, max_size=8)))
            continue
        at = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 16))]
        elif kind == "byte":
            buf[at] = draw(st.integers(0, 255))
        elif kind == "length" and len(buf) >= 8:
            # the TCP data length (offset 4) or the UDP length (offset 0)
            where = draw(st.sampled_from([0, 4]))
            buf[where : where + 4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        elif kind == "count" and len(buf) >= 10:
            # Number of Data 1 (offset 9 of a TCP frame) or Number of Data 2 (before the CRC)
            where = draw(st.sampled_from([9, len(buf) - 5]))
            buf[where] = draw(st.integers(0, 255))
    return bytes(buf)
