"""The incremental framer: read boundaries never matter, bad lengths fail early and for good."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika.wire import (
    CODEC_8,
    DEFAULT_MAX_FRAME,
    KEEPALIVE,
    AVLRecord,
    DataBeforeLoginError,
    DataFrame,
    Frame,
    FrameLengthError,
    Framer,
    FramingError,
    ImeiFrame,
    PreambleError,
    encode_avl_frame,
    encode_command_frame,
    encode_login,
)
from teltonika.wire.framer import MAX_IMEI_LENGTH

IMEI = "356307042441013"
LOGIN = encode_login(IMEI)
RECORD = AVLRecord(1560161136000, 1, 25.5, -54.25, 100, 90, 7, 50, 0, ((1, 1, 1), (66, 2, 24080)))
DATA = encode_avl_frame(CODEC_8, [RECORD])
COMMAND = encode_command_frame(0x0C, b"getinfo")


def feed_all(framer: Framer, *chunks: bytes) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out


def test_login_and_first_data_frame_in_one_read() -> None:
    """A login packet and a data frame in one read come out as two frames."""
    framer = Framer()
    assert feed_all(framer, LOGIN + DATA) == [ImeiFrame(IMEI.encode()), DataFrame(DATA)]
    assert framer.buffered == 0


def test_several_frames_per_read_and_split_frames() -> None:
    """A frame split over reads is held until complete; several frames in one read all come
    out; a read can end in the middle of a header."""
    framer = Framer()
    stream = LOGIN + DATA + COMMAND + DATA
    cut1, cut2 = len(LOGIN) + 5, len(LOGIN) + len(DATA) + 3
    assert feed_all(framer, stream[:cut1]) == [ImeiFrame(IMEI.encode())]
    assert framer.buffered == 5
    assert feed_all(framer, stream[cut1:cut2]) == [DataFrame(DATA)]
    assert framer.buffered == 3
    assert feed_all(framer, stream[cut2:]) == [DataFrame(COMMAND), DataFrame(DATA)]
    assert framer.buffered == 0


def test_one_byte_at_a_time() -> None:
    """Feeding one byte per read yields each frame exactly when its last byte arrives."""
    framer = Framer()
    stream = LOGIN + DATA
    seen = []
    for index in range(len(stream)):
        for frame in framer.feed(stream[index : index + 1]):
            seen.append((index, frame))
    assert seen == [
        (len(LOGIN) - 1, ImeiFrame(IMEI.encode())),
        (len(stream) - 1, DataFrame(DATA)),
    ]


def test_keepalive_before_login_and_between_frames() -> None:
    """0xFF is a keepalive wherever a frame may start: before the login, between frames,
    several in a row."""
    framer = Framer()
    frames = feed_all(framer, b"\xff" + LOGIN + b"\xff\xff" + DATA[:10], DATA[10:] + b"\xff")
    assert frames == [
        KEEPALIVE,
        ImeiFrame(IMEI.encode()),
        KEEPALIVE,
        KEEPALIVE,
        DataFrame(DATA),
        KEEPALIVE,
    ]


def test_empty_read() -> None:
    """An empty read yields nothing and changes nothing."""
    framer = Framer()
    assert feed_all(framer, DATA[:7], b"", b"") == []
    assert framer.buffered == 7


def test_zero_data_length_is_rejected() -> None:
    """A data frame declaring length 0 is rejected as soon as its header is complete."""
    framer = Framer()
    with pytest.raises(FrameLengthError) as caught:
        feed_all(framer, b"\x00" * 8)
    assert caught.value.offset == 4
    assert caught.value.reason == "length"


def test_length_above_maximum_rejected_before_the_body() -> None:
    """A length above the cap fails on the 8 header bytes alone: the body is never awaited
    or buffered."""
    framer = Framer(max_frame=1024)
    header = b"\x00\x00\x00\x00" + (1024 - 12 + 1).to_bytes(4, "big")
    with pytest.raises(FrameLengthError, match="1024-byte maximum") as caught:
        feed_all(framer, header)
    assert caught.value.offset == 4
    assert framer.buffered == 0


def test_length_at_maximum_is_accepted() -> None:
    """A frame of exactly ``max_frame`` bytes is a frame (it need not be valid to be cut)."""
    framer = Framer(max_frame=64)
    raw = b"\x00\x00\x00\x00" + (64 - 12).to_bytes(4, "big") + bytes(64 - 8)
    assert feed_all(framer, raw[:30], raw[30:]) == [DataFrame(raw)]


def test_default_maximum_and_huge_length() -> None:
    """The default cap is 64 KiB; a 4 GiB length claim fails on the header."""
    framer = Framer()
    assert framer.max_frame == DEFAULT_MAX_FRAME == 65536
    with pytest.raises(FrameLengthError):
        feed_all(framer, b"\x00\x00\x00\x00\xff\xff\xff\xff")


def test_max_frame_too_small_for_any_frame() -> None:
    """A cap below the smallest possible frame is a programming error."""
    with pytest.raises(ValueError, match="max_frame"):
        Framer(max_frame=19)


def test_imei_length_above_17() -> None:
    """An IMEI packet longer than 17 bytes is refused on its two length bytes."""
    with pytest.raises(FrameLengthError, match="IMEI length 18") as caught:
        feed_all(Framer(), b"\x00\x12")
    assert caught.value.offset == 0


def test_imei_length_17_is_cut() -> None:
    """17 bytes is the longest IMEI packet cut (``parse_imei`` then judges the content)."""
    assert feed_all(Framer(), b"\x00\x11" + b"1" * 17) == [ImeiFrame(b"1" * 17)]


def test_tls_client_hello_hint() -> None:
    """A TLS ClientHello (16 03 ...) is named as such: the device is configured for TLS."""
    with pytest.raises(FrameLengthError, match="TLS ClientHello"):
        feed_all(Framer(), bytes.fromhex("160301020001"))


@pytest.mark.parametrize("preamble", ["00000100", "00000001", "0000ffff"])
def test_nonzero_preamble_bytes(preamble: str) -> None:
    """Bytes 2-3 of a data frame's preamble must be zero; the first four bytes suffice."""
    with pytest.raises(PreambleError) as caught:
        feed_all(Framer(), bytes.fromhex(preamble))
    assert caught.value.offset == 0
    assert caught.value.reason == "preamble"


def test_frames_before_an_error_are_yielded_and_the_error_is_sticky() -> None:
    """Frames completed before a framing error in the same read still come out; then the
    error is raised, again on every later read, and nothing is buffered any more."""
    framer = Framer()
    frames: list[Frame] = []
    with pytest.raises(FramingError) as caught:
        for frame in framer.feed(LOGIN + DATA + b"\x00\x00\x00\x00\x00\x00\x00\x01" + DATA):
            frames.append(frame)
    assert frames == [ImeiFrame(IMEI.encode()), DataFrame(DATA)]
    assert caught.value.offset == len(LOGIN) + len(DATA) + 4
    assert framer.buffered == 0
    for later in (DATA, b"", b"\xff"):
        with pytest.raises(FramingError) as again:
            feed_all(framer, later)
        assert again.value is caught.value
    assert framer.buffered == 0


def test_partial_frame_is_held_once() -> None:
    """A nearly complete maximum-size frame is held in one buffer, not duplicated: the
    framer holds at most one maximum frame plus the current read."""
    framer = Framer(max_frame=4096)
    raw = b"\x00\x00\x00\x00" + (4096 - 12).to_bytes(4, "big") + bytes(4096 - 8)
    for start in range(0, 4095, 100):
        assert feed_all(framer, raw[start : min(start + 100, 4095)]) == []
        assert framer.buffered <= 4096
    assert feed_all(framer, raw[4095:] + LOGIN) == [DataFrame(raw), ImeiFrame(IMEI.encode())]
    assert framer.buffered == 0


def test_login_first_refuses_a_data_frame_at_its_header() -> None:
    """With login_first, the two zero bytes that start a data frame before any IMEI packet
    are enough to refuse it: nothing of its body is awaited or held."""
    framer = Framer(login_first=True)
    with pytest.raises(DataBeforeLoginError) as caught:
        feed_all(framer, b"\xff\x00\x00")
    assert caught.value.reason == "before_login"
    assert caught.value.offset == 1
    assert framer.buffered == 0


def test_login_first_lets_data_follow_the_imei_packet_in_one_read() -> None:
    """A device may send its first frames right behind its IMEI (a real capture holds the
    IMEI and four frames in one read): after the IMEI packet, data frames are cut."""
    framer = Framer(login_first=True)
    assert feed_all(framer, b"\xff" + LOGIN + DATA, DATA) == [
        KEEPALIVE,
        ImeiFrame(IMEI.encode()),
        DataFrame(DATA),
        DataFrame(DATA),
    ]


def _bytes_allocated_while_feeding(framer: Framer, stream: bytes) -> int:
    """Sum over reads of the memory each one-byte read allocated at its peak."""
    total = 0
    tracemalloc.start()
    try:
        for index in range(len(stream)):
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            feed_all(framer, stream[index : index + 1])
            _, peak = tracemalloc.get_traced_memory()
            total += peak - before
    finally:
        tracemalloc.stop()
    return total


def _one_frame_byte_by_byte(size: int) -> int:
    raw = b"\x00\x00\x00\x00" + (size - 12).to_bytes(4, "big") + bytes(size - 8)
    framer = Framer()
    allocated = _bytes_allocated_while_feeding(framer, raw)
    assert framer.buffered == 0
    return allocated


def test_a_frame_arriving_a_byte_at_a_time_costs_linear_memory_traffic() -> None:
    """A partial frame is not copied again on every read: the memory allocated while a
    frame arrives one byte per read grows linearly with the frame's size. Four times the
    size costs about four times as much (a copy per read would cost sixteen times)."""
    small = _one_frame_byte_by_byte(4 * 1024)
    large = _one_frame_byte_by_byte(16 * 1024)
    assert large < 8 * small, (small, large)


_PIECES = st.one_of(
    st.binary(max_size=40),
    st.just(LOGIN),
    st.just(b"\xff"),
    st.just(DATA),
    st.builds(
        lambda length, body: b"\x00\x00\x00\x00" + length.to_bytes(4, "big") + body,
        st.integers(0, 300),
        st.binary(max_size=300),
    ),
)


def _cut_with_login_first(chunks: list[bytes], max_frame: int) -> tuple[list[Frame], Any]:
    """Feed *chunks* to a login_first Framer, checking its bounds after every read;
    return the frames and the (type, reason) of the error that ended the stream."""
    framer = Framer(max_frame, login_first=True)
    frames: list[Frame] = []
    for chunk in chunks:
        try:
            frames.extend(framer.feed(chunk))
        except FramingError as error:
            with pytest.raises(type(error)):  # and for good
                feed_all(framer, LOGIN)
            return frames, (type(error), error.reason)
        assert framer.buffered < max_frame  # never a whole frame's worth
        if not any(isinstance(frame, ImeiFrame) for frame in frames):
            # before any IMEI packet, at most a partial IMEI packet is held
            assert framer.buffered <= 1 + MAX_IMEI_LENGTH
    return frames, None


@given(
    parts=st.lists(_PIECES, max_size=12),
    max_frame=st.integers(20, 400),
    data=st.data(),
)
def test_login_first_framer_properties(parts: list[bytes], max_frame: int, data: Any) -> None:
    """Whatever the bytes and however they are cut into reads: the same frames and the
    same error (a FramingError, nothing else) as in one read; no data frame before the
    first IMEI packet; nothing beyond a partial IMEI packet held before it, and less than
    one frame held after."""
    stream = b"".join(parts)
    whole = _cut_with_login_first([stream], max_frame)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert _cut_with_login_first(chunks, max_frame) == whole
    frames, _error = whole
    first_data = next((i for i, f in enumerate(frames) if isinstance(f, DataFrame)), None)
    if first_data is not None:
        assert any(isinstance(f, ImeiFrame) for f in frames[:first_data])
