"""The pure wire layer: bytes in, immutable records out, and back.

Nothing here imports the reactor, Redis, logging or metrics, so every function can be
driven by hypothesis and reused by any Twisted (or non-Twisted) program. The protocol
facts are in docs/protocol.rst; the invariants are:

* decoders raise only :class:`DecodeError` and its subclasses, whatever the bytes;
* the framer never buffers more than one maximum-size frame;
* a value is kept exactly as sent (IO values unsigned, with their width).
"""

from teltonika.wire.avl import decode_avl, encode_avl
from teltonika.wire.crc import crc16
from teltonika.wire.errors import (
    CRCError,
    DataBeforeLoginError,
    DecodeError,
    FieldValueError,
    FrameLengthError,
    FramingError,
    ImeiError,
    PreambleError,
    RecordCountError,
    TrailingBytesError,
    TruncatedError,
    UnknownCodecError,
)
from teltonika.wire.framer import DEFAULT_MAX_FRAME, Framer
from teltonika.wire.frames import unwrap, wrap
from teltonika.wire.login import ACCEPT, REJECT, encode_login, luhn_ok, parse_imei, tcp_ack
from teltonika.wire.messages import bcd_to_imei, decode_messages, encode_message, imei_to_bcd
from teltonika.wire.records import (
    CODEC_8,
    CODEC_8E,
    CODEC_12,
    CODEC_13,
    CODEC_14,
    CODEC_16,
    CODEC_NAMES,
    KEEPALIVE,
    MESSAGE_TYPE_COMMAND,
    MESSAGE_TYPE_NACK,
    MESSAGE_TYPE_RESPONSE,
    NX,
    AVLPacket,
    AVLRecord,
    DataFrame,
    DeviceMessage,
    Frame,
    ImeiFrame,
    IOElement,
    Keepalive,
    MessagePacket,
    Packet,
    UDPEnvelope,
    UDPPacket,
)
from teltonika.wire.udp import decode_udp, decode_udp_envelope, encode_udp, udp_ack, wrap_udp


def encode_avl_frame(codec_id: int, records: list[AVLRecord] | tuple[AVLRecord, ...]) -> bytes:
    """A complete TCP AVL data frame (for tests and the device simulator)."""
    return wrap(encode_avl(codec_id, records))


def encode_command_frame(codec_id: int, payload: bytes, imei: str | None = None) -> bytes:
    """A complete TCP codec 12 or 14 command frame (type 0x05)."""
    return wrap(encode_message(codec_id, payload, MESSAGE_TYPE_COMMAND, imei=imei))


__all__ = [
    "ACCEPT",
    "CODEC_8",
    "CODEC_8E",
    "CODEC_12",
    "CODEC_13",
    "CODEC_14",
    "CODEC_16",
    "CODEC_NAMES",
    "DEFAULT_MAX_FRAME",
    "KEEPALIVE",
    "MESSAGE_TYPE_COMMAND",
    "MESSAGE_TYPE_NACK",
    "MESSAGE_TYPE_RESPONSE",
    "NX",
    "REJECT",
    "AVLPacket",
    "AVLRecord",
    "CRCError",
    "DataBeforeLoginError",
    "DataFrame",
    "DecodeError",
    "DeviceMessage",
    "FieldValueError",
    "Frame",
    "FrameLengthError",
    "Framer",
    "FramingError",
    "IOElement",
    "ImeiError",
    "ImeiFrame",
    "Keepalive",
    "MessagePacket",
    "Packet",
    "PreambleError",
    "RecordCountError",
    "TrailingBytesError",
    "TruncatedError",
    "UDPEnvelope",
    "UDPPacket",
    "UnknownCodecError",
    "bcd_to_imei",
    "crc16",
    "decode_avl",
    "decode_messages",
    "decode_udp",
    "decode_udp_envelope",
    "encode_avl",
    "encode_avl_frame",
    "encode_command_frame",
    "encode_login",
    "encode_message",
    "encode_udp",
    "imei_to_bcd",
    "luhn_ok",
    "parse_imei",
    "tcp_ack",
    "udp_ack",
    "unwrap",
    "wrap",
    "wrap_udp",
]
