"""Every frame of the protocol vectors decodes as documented, or fails as documented.

The vectors (``vectors.json``, described in docs/protocol.rst, section 'Test vectors') are
real captures and documentation examples. Valid ones must decode to exactly the
``expected`` values (IO values compared as big-endian hex of their declared width, NX
values as hex); the ones marked ``crc_ok: false`` or ``structure_ok: false`` must raise
the precise :class:`DecodeError` subclass; the ``response`` bytes are what our encoders
produce.
"""

from __future__ import annotations

from typing import Any

import pytest

from teltonika.codecs import CodecRegistry, load_codecs
from teltonika.wire import (
    ACCEPT,
    KEEPALIVE,
    MESSAGE_TYPE_COMMAND,
    NX,
    REJECT,
    AVLPacket,
    AVLRecord,
    CRCError,
    DataFrame,
    DecodeError,
    Frame,
    FrameLengthError,
    Framer,
    ImeiFrame,
    MessagePacket,
    UDPPacket,
    UnknownCodecError,
    decode_udp,
    encode_command_frame,
    parse_imei,
    tcp_ack,
    udp_ack,
)
from tests.wire.vectors import BY_NAME, VECTORS, frame, is_valid

REGISTRY: CodecRegistry = load_codecs()

AVL_CODECS = {"8", "8E", "16"}
MESSAGE_CODECS = {"12", "13", "14"}


def _names(predicate: Any) -> list[str]:
    return [vector["name"] for vector in VECTORS if predicate(vector)]


TCP_AVL = _names(
    lambda v: (
        v["transport"] == "tcp"
        and v["codec"] in AVL_CODECS
        and "records" in v["expected"]
        and is_valid(v)
    )
)
TCP_MESSAGES = _names(lambda v: v["codec"] in MESSAGE_CODECS and is_valid(v))
UDP_VALID = _names(lambda v: v["transport"] == "udp" and v["codec"] in AVL_CODECS and is_valid(v))

INVALID: dict[str, type[DecodeError]] = {
    # the 2018 wiki example: structure fine, CRC field wrong
    "c16_wiki_2018_example_bad_crc": CRCError,
    # the data length promises 4 bytes more than the frame carries
    "c13_wiki_2022_example_truncated": FrameLengthError,
    # CRC is checked before the (also broken) structure
    "c13_traccar_size_excludes_timestamp": CRCError,
    "c14_wiki_nack_response_as_published": CRCError,
}


def io_hex(record: AVLRecord) -> dict[str, str]:
    """The IO elements as the vectors write them: ``{"<id>": "<hex of width>"}``."""
    out = {}
    for io_id, width, value in record.io:
        if width == NX:
            assert isinstance(value, bytes)
            out[str(io_id)] = value.hex()
        else:
            assert isinstance(value, int)
            out[str(io_id)] = value.to_bytes(width, "big").hex()
    return out


def check_records(records: tuple[AVLRecord, ...], expected: dict[str, Any]) -> None:
    """Compare decoded records with the vector's (possibly partial) record list."""
    assert len(records) == expected["record_count"] == expected["n2"]
    assert expected["records"], "a vector with records lists at least one"
    for want in expected["records"]:
        got = records[want["index"]]
        for field in (
            "timestamp_ms",
            "priority",
            "longitude",
            "latitude",
            "altitude",
            "angle",
            "satellites",
            "speed",
            "event_io_id",
        ):
            assert getattr(got, field) == want[field], (want["index"], field)
        assert len(got.io) == want["io_total"]
        if "generation_type" in want:
            assert got.generation_type == want["generation_type"]
        else:
            assert got.generation_type is None
        if "io" in want:
            # Some vectors list only the interesting IO elements; all listed must match,
            # and a complete list must match exactly.
            got_io = io_hex(got)
            assert {key: got_io.get(key) for key in want["io"]} == want["io"]
            if len(want["io"]) == want["io_total"]:
                assert got_io == want["io"]


def test_vector_file_is_complete() -> None:
    """The copy holds the 56 reference vectors, and every one is exercised below."""
    covered = (
        set(TCP_AVL)
        | set(TCP_MESSAGES)
        | set(UDP_VALID)
        | set(INVALID)
        | {
            "imei_login_wiki",
            "imei_reply_accept",
            "imei_reply_reject",
            "keepalive_ping_ff",
            "stream_imei_plus_four_c8_frames_in_one_read",
            "c15_wiki_hello",
            "udp_c16_wiki_as_published_malformed",
            "udp_ack_fmb1yx_doc_example",
            "tcp_ack_two_records_fmb1yx_doc",
        }
    )
    assert len(VECTORS) == 56
    assert covered == set(BY_NAME)


@pytest.mark.parametrize("name", TCP_AVL)
def test_tcp_avl_vector(name: str) -> None:
    """A valid TCP AVL frame decodes to the documented values and is ACKed with its count."""
    vector = BY_NAME[name]
    raw = frame(name)
    expected = vector["expected"]
    assert int.from_bytes(raw[4:8], "big") == expected["data_length"]
    assert raw[-2:].hex() == expected["crc16"]
    codec, packet = REGISTRY.decode_frame(raw)
    assert isinstance(packet, AVLPacket)
    assert codec.codec_id == packet.codec_id == expected["codec_id"]
    assert codec.name == vector["codec"]
    check_records(packet.records, expected)
    ack = codec.acknowledgement(packet)
    assert ack is not None
    assert ack.hex() == vector["response"]["hex"]


@pytest.mark.parametrize("name", TCP_MESSAGES)
def test_message_vector(name: str) -> None:
    """A valid codec 12/13/14 frame decodes to its type, prefix and payload; never ACKed."""
    vector = BY_NAME[name]
    expected = vector["expected"]
    codec, packet = REGISTRY.decode_frame(frame(name))
    assert isinstance(packet, MessagePacket)
    assert codec.codec_id == expected["codec_id"]
    assert codec.acknowledgement(packet) is None
    assert vector["response"]["hex"] is None
    assert len(packet.messages) == expected["message_count"] == expected["n2"]
    for message, want in zip(packet.messages, expected["messages"], strict=True):
        assert message.message_type == want["type"]
        if name == "c13_wiki_current_example":
            # docs/protocol.rst, section 'Codec 13': an implausible 4-byte seconds value
            # (364) with 8 bytes available is read as the wiki's 8-byte millisecond
            # timestamp.
            alternative = expected["alternative_8_byte_timestamp_reading"]
            assert message.timestamp_ms == alternative["timestamp_ms"]
            assert message.payload == alternative["payload_ascii"].encode()
            assert 8 + len(message.payload) == want["size_field"]
            continue
        if "payload_ascii" in want:
            assert message.payload == want["payload_ascii"].encode("ascii")
            assert message.text == want["payload_ascii"]
        else:
            assert message.payload.hex() == want["payload_hex"]
        prefix = 0
        if "imei" in want:
            assert message.imei == want["imei"]
            prefix = 8
        else:
            assert message.imei is None
        if "timestamp_s" in want:
            assert message.timestamp_ms == want["timestamp_s"] * 1000
            prefix = 4
        else:
            assert message.timestamp_ms is None
        assert prefix + len(message.payload) == want["size_field"]


QUANTITIES_IGNORED = [
    # Two messages under quantity 1 = 2 and quantity 2 = 1: an unknown type 0x7F with
    # payload ff0080, then a type 0x7F "getinfo".
    (
        "00000000000000170c027f00000003ff00807f00000007676574696e666f010000f9bb",
        [(0x7F, bytes.fromhex("ff0080")), (0x7F, b"getinfo")],
    ),
    # Two type 5 messages, "one" and "two", under quantity 1 = quantity 2 = 1.
    (
        "00000000000000130c0105000000036f6e65050000000374776f0100006625",
        [(0x05, b"one"), (0x05, b"two")],
    ),
]


@pytest.mark.parametrize(("hex_frame", "messages"), QUANTITIES_IGNORED)
def test_message_quantities_are_ignored(hex_frame: str, messages: list[tuple[int, bytes]]) -> None:
    """Codec 12 decoding ignores quantity 1 and quantity 2 (Teltonika's description says
    quantity 1 "is ignored when parsing") and reads messages to the end of the data."""
    _codec, packet = REGISTRY.decode_frame(bytes.fromhex(hex_frame))
    assert isinstance(packet, MessagePacket)
    assert [(m.message_type, m.payload) for m in packet.messages] == messages


def test_message_count_is_capped() -> None:
    """More messages than a quantity byte can count is refused (a hostile frame must not
    turn into thousands of published messages)."""
    from teltonika.wire import RecordCountError, wrap

    one = bytes((0x06,)) + (0).to_bytes(4, "big")
    body = bytes((0x0C, 1)) + one * 256 + b"\x01"
    with pytest.raises(RecordCountError):
        REGISTRY.decode_frame(wrap(body))
    _codec, packet = REGISTRY.decode_frame(wrap(bytes((0x0C, 1)) + one * 255 + b"\x01"))
    assert isinstance(packet, MessagePacket) and len(packet.messages) == 255


@pytest.mark.parametrize(
    "name",
    _names(
        lambda v: v["codec"] in {"12", "14"} and v["direction"] == "server->device" and is_valid(v)
    ),
)
def test_command_encoder_reproduces_vector(name: str) -> None:
    """Our codec 12/14 command encoder produces the documented request bytes exactly."""
    message = BY_NAME[name]["expected"]["messages"][0]
    assert message["type"] == MESSAGE_TYPE_COMMAND
    payload = (
        message["payload_ascii"].encode("ascii")
        if "payload_ascii" in message
        else bytes.fromhex(message["payload_hex"])
    )
    codec_id = BY_NAME[name]["expected"]["codec_id"]
    assert encode_command_frame(codec_id, payload, message.get("imei")) == frame(name)


@pytest.mark.parametrize("name", UDP_VALID)
def test_udp_vector(name: str) -> None:
    """A valid UDP datagram decodes (envelope and records) and is ACKed as documented."""
    vector = BY_NAME[name]
    expected = vector["expected"]
    raw = frame(name)
    assert int.from_bytes(raw[:2], "big") == expected["length_field"]
    datagram = decode_udp(raw)
    assert isinstance(datagram, UDPPacket)
    assert datagram.packet_id == expected["packet_id"]
    assert datagram.packet_type == expected["not_usable_byte"]
    assert datagram.avl_packet_id == expected["avl_packet_id"]
    assert datagram.imei == expected["imei"]
    assert datagram.packet.codec_id == expected["codec_id"]
    check_records(datagram.packet.records, expected)
    ack = udp_ack(datagram.packet_id, datagram.avl_packet_id, len(datagram.packet.records))
    assert ack.hex() == vector["response"]["hex"]


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_tcp_vector(name: str) -> None:
    """A frame documented as broken raises the precise error, naming an offset."""
    vector = BY_NAME[name]
    assert not is_valid(vector)
    with pytest.raises(INVALID[name]) as caught:
        REGISTRY.decode_frame(frame(name))
    assert caught.value.offset is not None
    assert "offset" in str(caught.value)


def test_invalid_udp_vector() -> None:
    """The wiki's codec 16 datagram with a wrong length field is rejected on that field."""
    with pytest.raises(FrameLengthError) as caught:
        decode_udp(frame("udp_c16_wiki_as_published_malformed"))
    assert caught.value.offset == 0


def test_truncated_vector_stalls_framer_without_error() -> None:
    """A frame shorter than its data length is not an error for the framer: it waits
    for the rest, holding only those bytes."""
    raw = frame("c13_wiki_2022_example_truncated")
    framer = Framer()
    assert list(framer.feed(raw)) == []
    assert framer.buffered == len(raw)


def test_codec15_is_unknown() -> None:
    """Codec 15 is not registered: the registry names the codec id it does not know."""
    with pytest.raises(UnknownCodecError) as caught:
        REGISTRY.decode_frame(frame("c15_wiki_hello"))
    assert caught.value.codec_id == 0x0F
    assert caught.value.offset == 8
    assert caught.value.reason == "unknown_codec"


def test_imei_login_vector() -> None:
    """The wiki login packet frames as one IMEI frame, parses, and is accepted with 01."""
    vector = BY_NAME["imei_login_wiki"]
    frames = list(Framer().feed(frame("imei_login_wiki")))
    assert len(frames) == 1
    assert isinstance(frames[0], ImeiFrame)
    assert len(frames[0].raw) == vector["expected"]["length_field"]
    assert parse_imei(frames[0].raw) == vector["expected"]["imei"]
    assert ACCEPT.hex() == vector["response"]["hex"]


def test_reply_vectors() -> None:
    """The server->device replies: accept, reject, TCP count ACK, UDP ACK."""
    assert frame("imei_reply_accept") == ACCEPT
    assert frame("imei_reply_reject") == REJECT
    assert tcp_ack(2) == frame("tcp_ack_two_records_fmb1yx_doc")
    assert udp_ack(0xABCD, 0xDD, 2) == frame("udp_ack_fmb1yx_doc_example")


def test_keepalive_vector() -> None:
    """The one-byte FF ping frames as a keepalive and nothing else."""
    assert list(Framer().feed(frame("keepalive_ping_ff"))) == [KEEPALIVE]


@pytest.mark.parametrize("chunk", [1, 7, 100, 10_000])
def test_stream_vector(chunk: int) -> None:
    """One read with an IMEI and four codec 8 frames splits at the documented offsets,
    whatever the read size, and each frame decodes and is ACKed as documented."""
    vector = BY_NAME["stream_imei_plus_four_c8_frames_in_one_read"]
    raw = frame(vector["name"])
    framer = Framer()
    frames: list[Frame] = []
    for start in range(0, len(raw), chunk):
        frames.extend(framer.feed(raw[start : start + chunk]))
    assert framer.buffered == 0
    wanted = vector["expected"]["frames"]
    assert len(frames) == len(wanted) == 5
    for got, want in zip(frames, wanted, strict=True):
        if want["kind"] == "imei":
            assert isinstance(got, ImeiFrame)
            assert raw[want["offset"] : want["offset"] + want["length"]] == (
                len(got.raw).to_bytes(2, "big") + got.raw
            )
            assert parse_imei(got.raw) == want["imei"]
            assert ACCEPT.hex() == want["reply_hex"]
            continue
        assert isinstance(got, DataFrame)
        assert got.raw == raw[want["offset"] : want["offset"] + want["length"]]
        assert got.codec_id == want["codec_id"]
        codec, packet = REGISTRY.decode_frame(got.raw)
        assert isinstance(packet, AVLPacket)
        assert len(packet.records) == want["record_count"]
        assert got.raw[-2:].hex() == want["crc16"]
        assert packet.records[0].timestamp_ms == want["first_timestamp_ms"]
        ack = codec.acknowledgement(packet)
        assert ack is not None and ack.hex() == want["ack_hex"]


@pytest.mark.parametrize(
    "name", _names(lambda v: v["crc_ok"] is False and v["structure_ok"] is True)
)
def test_bad_crc_vector_structure_still_parses(name: str) -> None:
    """The CRC-broken vectors whose structure is documented as sound: the CRC check is
    what rejects them, not the body walk."""
    raw = frame(name)
    expected = BY_NAME[name]["expected"]
    codec = REGISTRY.get(expected["codec_id"])
    assert codec is not None
    packet = codec.decode(raw, 8, len(raw) - 4)
    if isinstance(packet, AVLPacket):
        check_records(packet.records, expected)
    else:
        assert isinstance(packet, MessagePacket)
        assert packet.messages[0].imei == expected["messages"][0]["imei"]
