"""Every byte from the network is hostile: decoders only ever raise DecodeError.

Arbitrary bytes and mutated valid frames (bit flips, truncation, insertion, deletion, lies
in the length field and in the record and element counts) go through every entry point
the server uses: ``CodecRegistry.decode_frame``, each codec's ``decode``, ``decode_udp``,
``parse_imei`` and the ``Framer``. Mutated bodies are also re-wrapped with a correct CRC so
that the record walk itself (not just the CRC check) meets the damage. Lies about sizes
must be rejected from the bytes actually present, before anything is allocated for them.
"""

from __future__ import annotations

import gc
import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teltonika.codecs import load_codecs
from teltonika.interfaces import ICodec
from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    CODEC_16,
    NX,
    AVLRecord,
    DataFrame,
    DecodeError,
    FieldValueError,
    Framer,
    ImeiError,
    RecordCountError,
    TrailingBytesError,
    TruncatedError,
    decode_avl,
    decode_messages,
    decode_udp,
    decode_udp_envelope,
    encode_avl,
    encode_avl_frame,
    encode_udp,
    parse_imei,
    wrap,
)
from tests.wire.strategies import avl_batches, imeis, mutated, valid_data_frames
from tests.wire.vectors import VECTORS

REGISTRY = load_codecs()
FUZZ_EXAMPLES = max(600, settings().max_examples)  # settings(): the loaded profile's
"""The main fuzzers run more examples than the profile's default; still about 2 s each."""
VECTOR_FRAMES = [bytes.fromhex(v["hex"]) for v in VECTORS if v["transport"] == "tcp"]
VECTOR_DATAGRAMS = [
    bytes.fromhex(v["hex"]) for v in VECTORS if v["transport"] == "udp" and v["codec"] != "ack"
]


def only_decode_error(function: Callable[[bytes], Any], data: bytes) -> Any:
    """Call *function*; a DecodeError is fine, any other exception fails the test."""
    try:
        return function(data)
    except DecodeError as error:
        assert error.reason and " " not in error.reason  # a metric label, never data
        assert error.offset is not None  # every message names where it went wrong
        assert "offset" in str(error)
        return None


def all_codecs(data: bytes) -> None:
    """Every codec's body decoder, whatever the first byte says."""
    for codec in REGISTRY:

        def decode(d: bytes, c: ICodec = codec) -> object:
            return c.decode(d, 0, len(d))

        only_decode_error(decode, data)
    only_decode_error(lambda d: decode_avl(d, 0, len(d)), data)
    only_decode_error(lambda d: decode_messages(d, 0, len(d)), data)


def frame_all(data: bytes, chunk: int, max_frame: int = 2048) -> None:
    """Run *data* through a Framer in *chunk*-byte reads and decode every data frame."""
    framer = Framer(max_frame=max_frame)
    try:
        for start in range(0, len(data), chunk):
            piece = data[start : start + chunk]
            for frame in framer.feed(piece):
                if isinstance(frame, DataFrame):
                    assert len(frame.raw) <= max_frame
                    only_decode_error(REGISTRY.decode_frame, frame.raw)
                assert framer.buffered <= max_frame + len(piece)
            assert framer.buffered <= max_frame + len(piece)
    except DecodeError:
        assert framer.buffered == 0


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame (generated or a vector), damaged."""
    base = draw(st.one_of(valid_data_frames(), st.sampled_from(VECTOR_FRAMES)))
    return draw(mutated(base))


@st.composite
def rewrapped_bodies(draw: st.DrawFn) -> bytes:
    """A valid frame whose body is damaged and then given a correct envelope and CRC."""
    base = draw(st.one_of(valid_data_frames(), st.sampled_from(VECTOR_FRAMES)))
    return wrap(draw(mutated(base[8:-4])))


def udp_via_registry(datagram: bytes) -> object:
    """What the UDP listener does: the envelope, then the body through the registry."""
    envelope = decode_udp_envelope(datagram)
    return REGISTRY.decode_body(datagram, envelope.body_start, len(datagram))


@settings(max_examples=FUZZ_EXAMPLES)
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    """Random bytes into every decoder, login parser and framer: DecodeError or a result."""
    only_decode_error(REGISTRY.decode_frame, data)
    only_decode_error(decode_udp, data)
    only_decode_error(udp_via_registry, data)
    only_decode_error(parse_imei, data)
    all_codecs(data)
    frame_all(data, chunk=7, max_frame=64)


@given(
    codec_id=st.sampled_from([0x08, 0x8E, 0x10, 0x0C, 0x0D, 0x0E, 0x0F, 0x00, 0xFF]),
    tail=st.binary(max_size=400),
)
def test_arbitrary_body_with_a_valid_envelope(codec_id: int, tail: bytes) -> None:
    """A correct envelope and CRC around garbage reaches the codec, which only raises
    DecodeError."""
    only_decode_error(REGISTRY.decode_frame, wrap(bytes([codec_id]) + tail))


@settings(max_examples=FUZZ_EXAMPLES)
@given(raw=mutated_frames())
def test_mutated_frames(raw: bytes) -> None:
    """Damaged frames (CRC now mostly wrong) only raise DecodeError, via the registry and
    via a Framer fed in small reads."""
    only_decode_error(REGISTRY.decode_frame, raw)
    frame_all(raw, chunk=5)


@settings(max_examples=FUZZ_EXAMPLES)
@given(raw=rewrapped_bodies())
def test_mutated_bodies_with_correct_crc(raw: bytes) -> None:
    """Damaged bodies with a correct CRC reach the record walk; it only raises
    DecodeError, and a decoded record count always matches Number of Data 1 (message
    quantities are not parsed: a message frame holds at least one message)."""
    result = only_decode_error(REGISTRY.decode_frame, raw)
    if result is not None:
        _codec, packet = result
        records = getattr(packet, "records", None)
        if records is not None:
            assert len(records) == raw[9]
        else:
            assert 1 <= len(packet.messages) <= 255
    all_codecs(raw[8:-4])


@given(data=st.data())
def test_mutated_datagrams(data: st.DataObject) -> None:
    """Damaged UDP datagrams only raise DecodeError."""
    if data.draw(st.booleans()):
        base = data.draw(st.sampled_from(VECTOR_DATAGRAMS))
    else:
        codec_id, records = data.draw(avl_batches(max_records=3))
        base = encode_udp(data.draw(imeis), codec_id, records, 0xCAFE, 7)
    damaged = data.draw(mutated(base))
    only_decode_error(decode_udp, damaged)
    only_decode_error(udp_via_registry, damaged)


@given(raw=st.binary(max_size=40))
def test_parse_imei(raw: bytes) -> None:
    """Anything but 15 ASCII digits is an ImeiError."""
    try:
        imei = parse_imei(raw)
    except ImeiError:
        assert not (len(raw) == 15 and raw.isdigit() and raw.isascii())
    else:
        assert imei.encode() == raw


@given(data=st.data())
def test_framer_on_random_streams(data: st.DataObject) -> None:
    """A stream of valid frames with damage anywhere: the framer yields frames or fails
    for good, never holding more than one maximum frame plus the current read."""
    frames = data.draw(st.lists(valid_data_frames(), min_size=1, max_size=4))
    stream = data.draw(mutated(b"".join(frames)))
    frame_all(stream, chunk=data.draw(st.integers(1, 300)), max_frame=1024)


# --- size lies: rejected from the bytes present, before any allocation ------------------

RECORD = AVLRecord(1, 0, 1.0, 2.0, 3, 4, 5, 6, 7, ((1, 1, 1), (2, 2, 2)))


def _body_8e_with_nx(value: bytes = b"abcd") -> bytearray:
    record = AVLRecord(1, 0, 1.0, 2.0, 3, 4, 5, 6, 7, ((9, NX, value),))
    return bytearray(encode_avl(CODEC_8E, [record]))


def _lies() -> list[tuple[str, bytes, type[DecodeError]]]:
    cases: list[tuple[str, bytes, type[DecodeError]]] = []
    body = bytearray(encode_avl(CODEC_8, [RECORD]))
    body[1] = body[-1] = 255  # 255 records announced, 1 present
    cases.append(("record count", bytes(body), TruncatedError))
    body = bytearray(encode_avl(CODEC_8, [RECORD]))
    body[1] = 2  # N1 != N2
    cases.append(("N1 vs N2", bytes(body), RecordCountError))
    body = bytearray(encode_avl(CODEC_8, [RECORD]))
    body[1] = body[-1] = 0
    cases.append(("zero records", bytes(body), RecordCountError))
    # NX: offsets inside the 8E body: codec(1) N1(1) GPS(24) event(2) total(2) 4 x count(2)
    nx_count = 2 + 24 + 2 + 2 + 8
    body = _body_8e_with_nx()
    body[nx_count : nx_count + 2] = b"\xff\xff"  # 65535 NX elements announced
    cases.append(("NX count", bytes(body), TruncatedError))
    body = _body_8e_with_nx()
    body[nx_count + 4 : nx_count + 6] = b"\xff\xff"  # one NX element of 65535 bytes
    cases.append(("NX length", bytes(body), TruncatedError))
    body = _body_8e_with_nx()
    body[nx_count - 8 : nx_count - 6] = b"\xff\xff"  # 65535 one-byte elements announced
    cases.append(("IO group count", bytes(body), TruncatedError))
    body = bytearray(encode_avl(CODEC_8E, [RECORD]))
    body[2 + 24 + 2 : 2 + 24 + 4] = b"\x00\x09"  # total says 9, groups hold 2
    cases.append(("IO total", bytes(body), FieldValueError))
    body = bytearray(encode_avl(CODEC_16, [RECORD]))
    body[-1:-1] = b"\x00\x00"
    cases.append(("trailing bytes", bytes(body), TrailingBytesError))
    body = bytearray(b"\x0c\x01\x06\xff\xff\xff\xf0hello\x01")  # message size ~4 GiB
    cases.append(("message size", bytes(body), TruncatedError))
    return cases


@pytest.mark.parametrize(("name", "body", "error"), _lies(), ids=[c[0] for c in _lies()])
def test_size_lies_are_rejected_without_allocating(
    name: str, body: bytes, error: type[DecodeError]
) -> None:
    """A count or length larger than the frame is rejected with a precise error, and
    decoding allocates little more than the frame itself."""
    raw = wrap(body)
    REGISTRY.decode_frame(encode_avl_frame(CODEC_8, [RECORD]))  # warm caches
    tracemalloc.start()
    try:
        with pytest.raises(error):
            REGISTRY.decode_frame(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, name


def test_distinct_group_counts_do_not_grow_memory() -> None:
    """Hostile frames with ever new IO group sizes must not fill a cache without bound:
    decoding a thousand of them allocates about as much as decoding a few."""

    def frame_with_ones(n: int) -> bytes:
        io = tuple((i % 256, 1, 0) for i in range(n))
        return encode_avl_frame(CODEC_8E, [AVLRecord(1, 0, 0.0, 0.0, 0, 0, 0, 0, 0, io)])

    frames = [frame_with_ones(n) for n in range(1, 1001)]
    tracemalloc.start()
    try:
        for raw in frames:
            REGISTRY.decode_frame(raw)
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 4 * 1024 * 1024


def test_many_small_layouts_do_not_grow_memory() -> None:
    """Every combination of small group sizes (the most compiled layouts the cache can be
    made to hold): what stays allocated after decoding them all is bounded."""
    width_of = (1, 2, 4, 8)
    frames = []
    for counts in itertools.product(range(8), repeat=4):
        io = tuple((i, width_of[g], 0) for g, n in enumerate(counts) for i in range(n))
        record = AVLRecord(1, 0, 0.0, 0.0, 0, 0, 0, 0, 0, io)
        frames.append(encode_avl_frame(CODEC_16, [record]))
    gc.collect()
    tracemalloc.start()
    try:
        for raw in frames:
            REGISTRY.decode_frame(raw)
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert retained < 1024 * 1024
