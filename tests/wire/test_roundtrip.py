"""Encode then decode gives the values back, for every codec and the UDP envelope;
and any chunking of a valid stream yields the same frames in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teltonika.codecs import load_codecs
from teltonika.wire import (
    CODEC_8,
    CODEC_8E,
    CODEC_12,
    CODEC_13,
    CODEC_14,
    CODEC_16,
    MESSAGE_TYPE_COMMAND,
    NX,
    AVLPacket,
    AVLRecord,
    DeviceMessage,
    Frame,
    Framer,
    MessagePacket,
    bcd_to_imei,
    decode_avl,
    decode_udp,
    encode_avl,
    encode_avl_frame,
    encode_command_frame,
    encode_message,
    encode_udp,
    imei_to_bcd,
    tcp_ack,
    unwrap,
    wrap,
)
from tests.wire.strategies import avl_batches, avl_records, cut, grouped, imeis, streams

REGISTRY = load_codecs()


def _check_avl_round_trip(codec_id: int, records: list[AVLRecord]) -> None:
    raw = encode_avl_frame(codec_id, records)
    codec, packet = REGISTRY.decode_frame(raw)
    assert codec.codec_id == codec_id
    assert packet == AVLPacket(codec_id, tuple(grouped(r) for r in records))
    assert codec.acknowledgement(packet) == tcp_ack(len(records))
    # and the codec plugin's own encoder is the inverse of its decoder
    assert wrap(codec.encode(packet)) == encode_avl_frame(codec_id, packet.records)


# One test per codec rather than @pytest.mark.parametrize: pytest-twisted wraps a
# hypothesis test's inner function once per call and breaks on parametrized @given.


@given(records=st.lists(avl_records(CODEC_8), min_size=1, max_size=4))
def test_codec8_round_trip(records: list[AVLRecord]) -> None:
    """A codec 8 frame of any valid records decodes back to those records (IO grouped
    by width, as the format orders them) and is ACKed with its record count."""
    _check_avl_round_trip(CODEC_8, records)


@given(records=st.lists(avl_records(CODEC_8E), min_size=1, max_size=4))
def test_codec8e_round_trip(records: list[AVLRecord]) -> None:
    """Codec 8 Extended round-trips, NX elements and 16-bit IO ids included."""
    _check_avl_round_trip(CODEC_8E, records)


@given(records=st.lists(avl_records(CODEC_16), min_size=1, max_size=4))
def test_codec16_round_trip(records: list[AVLRecord]) -> None:
    """Codec 16 round-trips, generation type included."""
    _check_avl_round_trip(CODEC_16, records)


def test_avl_frame_with_255_records() -> None:
    """The largest record count the one-byte field allows round-trips."""
    record = AVLRecord(1, 0, -1.5, 2.25, -3, 4, 5, 6, 7, ((1, 1, 1), (300, NX, b"\x01")))
    raw = encode_avl_frame(CODEC_8E, [record] * 255)
    _, packet = REGISTRY.decode_frame(raw)
    assert isinstance(packet, AVLPacket)
    assert packet.records == (record,) * 255


@pytest.mark.parametrize("codec_id", [CODEC_8, CODEC_8E, CODEC_16])
def test_encoder_rejects_what_the_codec_cannot_carry(codec_id: int) -> None:
    """No records, more than 255, or an NX element outside 8E are encoding errors."""
    record = AVLRecord(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="1 to 255"):
        encode_avl(codec_id, [])
    with pytest.raises(ValueError, match="1 to 255"):
        encode_avl(codec_id, [record] * 256)
    nx_record = AVLRecord(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, ((1, NX, b"x"),))
    if codec_id == CODEC_8E:
        body = encode_avl(codec_id, [nx_record])
        assert decode_avl(body, 0, len(body)).records == (nx_record,)
    else:
        with pytest.raises(ValueError, match="width"):
            encode_avl(codec_id, [nx_record])


@given(
    batch=avl_batches(),
    packet_id=st.integers(0, 0xFFFF),
    avl_packet_id=st.integers(0, 255),
    packet_type=st.integers(0, 255),
    imei=imeis,
)
def test_udp_round_trip(
    batch: tuple[int, list[AVLRecord]],
    packet_id: int,
    avl_packet_id: int,
    packet_type: int,
    imei: str,
) -> None:
    """A UDP datagram gives back its envelope fields, IMEI and records."""
    codec_id, records = batch
    datagram = decode_udp(
        encode_udp(imei, codec_id, records, packet_id, avl_packet_id, packet_type)
    )
    assert datagram.packet_id == packet_id
    assert datagram.avl_packet_id == avl_packet_id
    assert datagram.packet_type == packet_type
    assert datagram.imei == imei
    assert datagram.packet == AVLPacket(codec_id, tuple(grouped(r) for r in records))


@given(
    messages=st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=40)), min_size=1, max_size=8
    ),
    quantity_1=st.integers(0, 255),
    quantity_2=st.integers(0, 255),
)
def test_message_quantities_never_matter(
    messages: list[tuple[int, bytes]], quantity_1: int, quantity_2: int
) -> None:
    """Codec 12 frames with any number of messages decode to exactly those messages in
    order, whatever the two quantity bytes say (neither is parsed: docs/protocol.rst)."""
    body = bytes((CODEC_12, quantity_1))
    for message_type, payload in messages:
        body += bytes((message_type,)) + len(payload).to_bytes(4, "big") + payload
    _codec, packet = REGISTRY.decode_frame(wrap(body + bytes((quantity_2,))))
    assert packet == MessagePacket(
        CODEC_12, tuple(DeviceMessage(CODEC_12, t, payload) for t, payload in messages)
    )


@given(payload=st.binary(max_size=300), message_type=st.sampled_from([0x05, 0x06, 0x11]))
def test_codec12_round_trip(payload: bytes, message_type: int) -> None:
    """Codec 12 carries any payload bytes and any message type, unchanged."""
    raw = wrap(encode_message(CODEC_12, payload, message_type))
    codec, packet = REGISTRY.decode_frame(raw)
    assert packet == MessagePacket(CODEC_12, (DeviceMessage(CODEC_12, message_type, payload),))
    assert codec.acknowledgement(packet) is None
    assert wrap(codec.encode(packet)) == raw


@given(payload=st.binary(max_size=300), seconds=st.integers(0x10000000, 2**32 - 1))
def test_codec13_round_trip(payload: bytes, seconds: int) -> None:
    """Codec 13 gives back its (4-byte seconds) timestamp in milliseconds, and the payload."""
    raw = wrap(encode_message(CODEC_13, payload, 0x06, timestamp_ms=seconds * 1000 + 999))
    codec, packet = REGISTRY.decode_frame(raw)
    assert packet == MessagePacket(
        CODEC_13, (DeviceMessage(CODEC_13, 0x06, payload, timestamp_ms=seconds * 1000),)
    )
    assert codec.acknowledgement(packet) is None


@given(
    payload=st.binary(max_size=300), imei=imeis, message_type=st.sampled_from([0x05, 0x06, 0x11])
)
def test_codec14_round_trip(payload: bytes, imei: str, message_type: int) -> None:
    """Codec 14 gives back the IMEI it carries (BCD) and the payload."""
    raw = wrap(encode_message(CODEC_14, payload, message_type, imei=imei))
    codec, packet = REGISTRY.decode_frame(raw)
    assert packet == MessagePacket(
        CODEC_14, (DeviceMessage(CODEC_14, message_type, payload, imei=imei),)
    )
    assert codec.acknowledgement(packet) is None
    assert wrap(codec.encode(packet)) == raw


@given(imei=imeis)
def test_imei_bcd_round_trip(imei: str) -> None:
    """Codec 14's 8-byte BCD IMEI encodes and decodes any 15-digit IMEI."""
    assert bcd_to_imei(imei_to_bcd(imei)) == imei


def test_command_frame_is_a_type_5_message() -> None:
    """``encode_command_frame`` builds the type 0x05 frames the server sends."""
    raw = encode_command_frame(CODEC_12, b"getinfo")
    _, packet = REGISTRY.decode_frame(raw)
    assert packet == MessagePacket(
        CODEC_12, (DeviceMessage(CODEC_12, MESSAGE_TYPE_COMMAND, b"getinfo"),)
    )
    assert unwrap(raw) == len(raw) - 4


def _frames(framer: Framer, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
        assert framer.buffered <= framer.max_frame + len(chunk)
    return out


@given(data=st.data())
def test_any_chunking_yields_the_same_frames(data: st.DataObject) -> None:
    """Keepalives, a login and data frames come out whole and in order however the
    stream is cut, including one byte per read."""
    stream, expected = data.draw(streams())
    framer = Framer()
    assert _frames(framer, data.draw(cut(stream))) == expected
    assert framer.buffered == 0
    one_byte = Framer()
    assert _frames(one_byte, [stream[i : i + 1] for i in range(len(stream))]) == expected
    assert one_byte.buffered == 0
