"""The UDP AVL datagram envelope and its ACK (docs/protocol.rst, section 'UDP channel').

A datagram has no preamble, no data length and no CRC::

    length u16 | packet id u16 | packet type u8 | AVL packet id u8 |
    IMEI length u16 | IMEI | AVL body (codec id .. Number of Data 2)

The server answers ``0005 <packet id> 01 <AVL packet id> <accepted count>``; the device
checks the AVL packet id and the count and resends otherwise.
"""

from __future__ import annotations

from typing import Final

from teltonika.wire.avl import decode_avl, encode_avl
from teltonika.wire.errors import FieldValueError, FrameLengthError, ImeiError, TruncatedError
from teltonika.wire.framer import MAX_IMEI_LENGTH
from teltonika.wire.records import AVLRecord, UDPEnvelope, UDPPacket

MAX_DATAGRAM: Final = 65507
_HEADER: Final = 8


def decode_udp_envelope(datagram: bytes) -> UDPEnvelope:
    """Decode the envelope of one UDP AVL datagram; its body is left to a codec.

    :raise DecodeError: a length that does not match the datagram or a bad IMEI field.
    """
    size = len(datagram)
    if size < _HEADER:
        raise TruncatedError(f"datagram of {size} bytes is shorter than its header", 0)
    length = int.from_bytes(datagram[0:2], "big")
    if length != size - 2:
        raise FrameLengthError(f"length field {length} does not match a {size}-byte datagram", 0)
    imei_length = int.from_bytes(datagram[6:8], "big")
    if not 1 <= imei_length <= MAX_IMEI_LENGTH:
        raise FrameLengthError(f"IMEI length {imei_length} is out of range", 6)
    body_start = _HEADER + imei_length
    if body_start > size:
        raise TruncatedError("IMEI runs past the datagram", _HEADER)
    raw_imei = datagram[_HEADER:body_start]
    if not raw_imei.isdigit():
        raise ImeiError(f"IMEI bytes {raw_imei.hex()} are not ASCII digits", _HEADER)
    return UDPEnvelope(
        int.from_bytes(datagram[2:4], "big"),
        datagram[4],
        datagram[5],
        raw_imei.decode("ascii"),
        body_start,
    )


def decode_udp(datagram: bytes) -> UDPPacket:
    """Decode one UDP AVL datagram whose body is codec 8, 8E or 16.

    :raise DecodeError: a length that does not match the datagram, a bad IMEI or a bad body.
    """
    envelope = decode_udp_envelope(datagram)
    packet = decode_avl(datagram, envelope.body_start, len(datagram))
    return UDPPacket(
        envelope.packet_id,
        envelope.packet_type,
        envelope.avl_packet_id,
        envelope.imei,
        packet,
    )


def wrap_udp(
    imei: str, body: bytes, packet_id: int = 0, avl_packet_id: int = 0, packet_type: int = 0x01
) -> bytes:
    """Put an encoded body (codec id through Number of Data 2) into a UDP AVL datagram."""
    raw_imei = imei.encode("ascii")
    rest = (
        packet_id.to_bytes(2, "big")
        + bytes((packet_type, avl_packet_id))
        + len(raw_imei).to_bytes(2, "big")
        + raw_imei
        + body
    )
    if len(rest) + 2 > MAX_DATAGRAM:
        raise FieldValueError("datagram too large", 0)
    return len(rest).to_bytes(2, "big") + rest


def encode_udp(
    imei: str,
    codec_id: int,
    records: list[AVLRecord] | tuple[AVLRecord, ...],
    packet_id: int = 0,
    avl_packet_id: int = 0,
    packet_type: int = 0x01,
) -> bytes:
    """Build a UDP AVL datagram (for tests and the device simulator)."""
    return wrap_udp(imei, encode_avl(codec_id, records), packet_id, avl_packet_id, packet_type)


def udp_ack(packet_id: int, avl_packet_id: int, accepted: int) -> bytes:
    """The server's reply to an AVL datagram, echoing both ids."""
    return b"\x00\x05" + packet_id.to_bytes(2, "big") + b"\x01" + bytes((avl_packet_id, accepted))
